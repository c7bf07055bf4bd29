# Shared by scripts/serve and scripts/test: create .venv if missing and install the project.
# torch is installed first and pinned: an unpinned torch would pull a multi-GB CUDA build.
ensure_venv() {
  local extra="$1"  # "" or "[dev]"
  local stamp=".venv/.installed${extra}"
  # A dev install includes the runtime install.
  if [ -z "$extra" ] && [ -f ".venv/.installed[dev]" ]; then stamp=".venv/.installed[dev]"; fi
  if [ ! -x .venv/bin/python ]; then
    echo "Creating .venv..."
    python3 -m venv .venv
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "Installing the project${extra} into .venv..."
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet "torch==2.13.0"
    .venv/bin/pip install --quiet -e ".${extra}"
    touch "$stamp"
  fi
}
