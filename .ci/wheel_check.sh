#!/usr/bin/env bash
# The product as a user installs it: build the wheel, install it (no -e) into a fresh venv, and run the
# commands that must work without the source checkout, from an empty folder.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$repo/.venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$work/dist" "$repo"
"$work/venv/bin/pip" install -q -c "$repo/constraints.txt" "$work"/dist/resnet_launcher-*.whl
mkdir "$work/empty"
cd "$work/empty"
export PATH="$work/venv/bin:$PATH" WANDB_MODE=disabled
python - <<'PY'
import launcher, pathlib
assert "site-packages" in launcher.__file__, f"launcher imported from {launcher.__file__}, not the installed wheel"
print(f"wheel check: launcher from {pathlib.Path(launcher.__file__).parent}")
PY
launcher train --recipe a3 --help | grep -q -- "--img-size"
echo "wheel check: launcher train --recipe a3 --help OK"
launcher slurm --nodes 2 --gpus-per-node 8 --recipe a2 --data X --dry-run > slurm.sbatch
grep -q "^#SBATCH --nodes=2" slurm.sbatch && grep -q "^#SBATCH --gpus-per-node=8" slurm.sbatch && grep -q "^slurm_main" slurm.sbatch
bash -n slurm.sbatch
echo "wheel check: launcher slurm --dry-run OK (self-contained script)"
launcher demo --quiet --epochs 1
test -f runs/demo/train/summary.json && test -f runs/demo/train/report.html
echo "wheel check: launcher demo OK"
