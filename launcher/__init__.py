"""resnet-launcher: ResNet training with the 'ResNet Strikes Back' recipes on any hardware."""

__version__ = "0.1.0"
