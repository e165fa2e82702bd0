#!/usr/bin/env bash
# Installs this project and what it needs into one Python environment, from the repo root:
#
#   bash tools/install.sh                       # torch (if absent), Detectron2, vfnet[dev]
#   bash tools/install.sh --parity-env DIR      # the same, then DIR: a venv with MMDetection
#
# Environment:
#   PYTHON=path/to/python     the interpreter to install into (default: the active virtualenv's
#                             python, else python3)
#   DETECTRON2_SOURCE=PATH    build Detectron2 from a local checkout or a source archive
#                             (.tar.gz, .zip) instead of its git repository
#   FORCE_DETECTRON2_BUILD=1  build Detectron2 even when a working one is already installed
#   VFNET_WHEEL_CACHE=DIR     where the Detectron2 wheel built from a source archive is kept for
#                             the next environment (default ~/.cache/vfnet/wheels; off: none)
#   CXX=...                   the C++ compiler for Detectron2's extension
#
# Detectron2 is on no package registry: it is built from source against the environment's torch
# (pip install --no-build-isolation), and the build is skipped when an installed Detectron2's
# extension loads with this torch. A CUDA build of torch is installed by the user beforehand;
# without any torch this installs torch and torchvision from the package index.
set -euo pipefail

DETECTRON2_GIT="git+https://github.com/facebookresearch/detectron2.git"
PARITY_PACKAGES=("setuptools<81" "mmdet==3.3.0" "mmengine==0.10.7" "mmcv-lite==2.1.0")

say() { printf '\n==> %s  [%d s]\n' "$*" "$SECONDS"; }
note() { printf '    %s\n' "$*"; }
die() { printf '\ninstall.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

PARITY_DIR=""
while (($#)); do
    case "$1" in
        --parity-env) (($# >= 2)) || die "--parity-env needs a directory: --parity-env venv-mmdet"
                      PARITY_DIR=$2; shift 2 ;;
        --parity-env=*) PARITY_DIR=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1' (see the usage above)" ;;
    esac
done

# Paths given by the user are relative to where they ran this; the rest runs in the repo root.
abspath() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
[[ -z "$PARITY_DIR" ]] || PARITY_DIR=$(abspath "$PARITY_DIR")
[[ -z "${DETECTRON2_SOURCE:-}" ]] || DETECTRON2_SOURCE=$(abspath "$DETECTRON2_SOURCE")
[[ "${PYTHON:-}" != */* ]] || PYTHON=$(abspath "$PYTHON")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
[[ -f setup.py && -d projects/VFNet/vfnet ]] || die "$ROOT is not this project's checkout"

# Child interpreters run from / so that a detectron2/ or vfnet/ folder in the current directory
# cannot stand in for the installed package.
py() { (cd / && "$PY" "$@"); }
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

# ---------------------------------------------------------------------------------------------
say "Interpreter"
if [[ -n "${PYTHON:-}" ]]; then
    PY=$PYTHON; why="\$PYTHON"
elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PY=$VIRTUAL_ENV/bin/python; why="the active virtualenv \$VIRTUAL_ENV"
else
    PY=python3; why="default: python3 on PATH; set PYTHON=path/to/python for another one"
fi
command -v "$PY" >/dev/null 2>&1 \
    || die "no interpreter '$PY': install Python 3.9+ or set PYTHON=path/to/python"
PY=$("$PY" -c 'import sys; print(sys.executable)') \
    || die "'$PY' does not run: set PYTHON=path/to/a/working/python"
note "$PY ($why)"
note "$(py -c 'import sys; print("Python %d.%d.%d, sys.prefix %s" % (sys.version_info[:3] + (sys.prefix,)))')"
py -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
    || die "this project needs Python 3.9 or later: set PYTHON=path/to/python3.9+"

# ---------------------------------------------------------------------------------------------
say "Preflight: checking what the install needs before installing anything"
py -m pip --version >/dev/null 2>&1 \
    || die "pip is missing for $PY: run '$PY -m ensurepip --upgrade' (Debian: apt-get install python3-pip)"
note "pip: $(py -m pip --version | cut -d' ' -f1-2)"

TORCH_VERSION=$(py -c 'import torch; print(torch.__version__)' 2>/dev/null) || TORCH_VERSION=""
if [[ -z "$TORCH_VERSION" ]]; then
    note "torch: not installed: torch and torchvision will be installed from the package index"
    note "       (for a CUDA build, install torch for your CUDA first and run this again)"
else
    py -c 'import sys, torch; v = torch.__version__.split("+")[0].split("."); sys.exit(int(v[0]) < 2)' \
        || die "torch $TORCH_VERSION is too old: this project needs torch 2.0 or later (pip install -U torch torchvision), then run this again"
    note "torch: $TORCH_VERSION"
fi

d2_check() { py -c 'import detectron2, detectron2._C; print(detectron2.__version__)' 2>&1; }
D2_BUILD=1
if [[ -n "$TORCH_VERSION" ]]; then
    if D2_OUT=$(d2_check); then
        if [[ "${FORCE_DETECTRON2_BUILD:-0}" == 1 ]]; then
            note "Detectron2 $D2_OUT works, but FORCE_DETECTRON2_BUILD=1: it will be rebuilt"
        else
            D2_BUILD=0; D2_VERSION=$D2_OUT
        fi
    elif py -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("detectron2") is None)' 2>/dev/null; then
        note "Detectron2 is installed but does not load with this torch (rebuilt below):"
        note "  $(printf '%s' "$D2_OUT" | tail -n 1)"
    fi
fi

if ((D2_BUILD)); then
    if [[ -n "${DETECTRON2_SOURCE:-}" ]]; then
        [[ -e "$DETECTRON2_SOURCE" ]] \
            || die "DETECTRON2_SOURCE=$DETECTRON2_SOURCE does not exist: point it at a Detectron2 checkout or source archive (.tar.gz, .zip), or unset it to use $DETECTRON2_GIT"
        D2_SRC=$(cd "$(dirname "$DETECTRON2_SOURCE")" && pwd)/$(basename "$DETECTRON2_SOURCE")
        if [[ -d "$D2_SRC" ]]; then
            [[ -f "$D2_SRC/setup.py" ]] \
                || die "DETECTRON2_SOURCE=$D2_SRC has no setup.py: point it at the top of a Detectron2 checkout"
        else
            case "$D2_SRC" in
                *.tar.gz|*.tgz|*.zip) ;;
                *) die "DETECTRON2_SOURCE=$D2_SRC is neither a directory nor a .tar.gz/.zip archive" ;;
            esac
        fi
        note "Detectron2: will be built from \$DETECTRON2_SOURCE=$D2_SRC"
    else
        D2_SRC=$DETECTRON2_GIT
        command -v git >/dev/null 2>&1 \
            || die "git is needed to fetch Detectron2 from $DETECTRON2_GIT: install git (Debian: apt-get install git), or set DETECTRON2_SOURCE to a checkout or source archive"
        # Before anything is installed: a machine that cannot reach the repository needs a
        # local source (pip's clone would fail only after torch is installed).
        D2_REMOTE=${DETECTRON2_GIT#git+}
        if ! GIT_TERMINAL_PROMPT=0 timeout 60 git ls-remote --exit-code "$D2_REMOTE" HEAD >/dev/null 2>&1; then
            die "cannot reach Detectron2's repository $D2_REMOTE (git ls-remote failed: no network, or a proxy is needed). Detectron2 is on no package registry: build it from a local source instead, DETECTRON2_SOURCE=path/to/detectron2 (a checkout, or a source archive .tar.gz/.zip) bash tools/install.sh"
        fi
        note "Detectron2: will be built from $D2_SRC (reachable)"
    fi
    if [[ -n "${CXX:-}" ]]; then
        command -v "${CXX%% *}" >/dev/null 2>&1 \
            || die "no C++ compiler: CXX=$CXX is not found: fix CXX, or unset it and install g++ (Debian: apt-get install g++)"
        note "C++ compiler: $(command -v "${CXX%% *}") (\$CXX)"
    elif command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1; then
        note "C++ compiler: $(command -v c++ || command -v g++)"
    else
        die "no C++ compiler: install g++ (Debian: apt-get install g++), or set CXX=path/to/compiler; Detectron2's extension is compiled here"
    fi
    PY_INCLUDE=$(py -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [[ -f "$PY_INCLUDE/Python.h" ]] \
        || die "no Python headers ($PY_INCLUDE/Python.h): install them (Debian: apt-get install python3-dev) to compile Detectron2's extension"
fi

if [[ -n "$PARITY_DIR" ]]; then
    py -c 'import venv, ensurepip' 2>/dev/null \
        || die "$PY cannot create virtual environments (no venv/ensurepip): Debian: apt-get install python3-venv"
    if [[ -e "$PARITY_DIR" && ! -f "$PARITY_DIR/pyvenv.cfg" ]] && [[ -n "$(ls -A "$PARITY_DIR" 2>/dev/null)" ]]; then
        die "--parity-env $PARITY_DIR exists and is not a virtual environment: give a new or empty directory"
    fi
    note "parity environment: $PARITY_DIR"
fi
note "all found"

# ---------------------------------------------------------------------------------------------
say "Build tools: setuptools<81 (Detectron2's model_zoo imports pkg_resources) and wheel"
pip_install "setuptools<81" wheel

if [[ -z "$TORCH_VERSION" ]]; then
    say "torch: installing torch and torchvision from the package index"
    pip_install torch torchvision "setuptools<81"
    TORCH_VERSION=$(py -c 'import torch; print(torch.__version__)') \
        || die "torch was installed but does not import: see the pip output above"
    note "torch $TORCH_VERSION"
    if [[ "${FORCE_DETECTRON2_BUILD:-0}" != 1 ]] && D2_OUT=$(d2_check); then
        D2_BUILD=0; D2_VERSION=$D2_OUT
    fi
fi

# ---------------------------------------------------------------------------------------------
if ((D2_BUILD)); then
    D2_ARGS=()
    # The same version already installed (built against another torch) would count as
    # satisfied: reinstall it, keeping its dependencies.
    if py -c 'import importlib.metadata as m; m.version("detectron2")' >/dev/null 2>&1; then
        D2_ARGS+=(--force-reinstall --no-deps)
    fi
    # A source archive's build is kept as a wheel, keyed by the archive's content, torch and
    # Python (and whether CUDA is built), so that a new environment with the same torch installs
    # it in seconds; a directory or git source is built each time.
    D2_WHEEL=""
    if [[ -f "$D2_SRC" && "${VFNET_WHEEL_CACHE:-}" != off ]]; then
        D2_KEY=$(sha256sum "$D2_SRC" | cut -c1-16)-torch$TORCH_VERSION-$(py -c '
import os, sys, torch
cuda = torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"
print("cp%d%d-%s" % (sys.version_info[0], sys.version_info[1], "cuda" if cuda else "cpu"))')
        D2_CACHE=${VFNET_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vfnet/wheels}/detectron2-$D2_KEY
        D2_WHEEL=$(ls "$D2_CACHE"/detectron2-*.whl 2>/dev/null | head -n 1 || true)
        if [[ -n "$D2_WHEEL" ]]; then
            say "Detectron2: installing the wheel built before from this source and torch $TORCH_VERSION"
            note "$D2_WHEEL (VFNET_WHEEL_CACHE=off builds it again)"
            if ! pip_install "${D2_ARGS[@]}" "$D2_WHEEL" || ! D2_VERSION=$(d2_check); then
                note "the cached wheel does not work here: building Detectron2 instead"
                rm -rf "$D2_CACHE"; D2_WHEEL=""
            fi
        fi
    fi
    if [[ -z "$D2_WHEEL" ]]; then
        say "Detectron2: building from $D2_SRC against torch $TORCH_VERSION (a few minutes)"
        if [[ -n "${D2_CACHE:-}" ]]; then
            # Built into a temporary folder and moved into the cache whole: a build that fails or
            # is interrupted leaves no wheel there.
            D2_TMP=$(mktemp -d)
            "$PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps \
                -w "$D2_TMP" "$D2_SRC" \
                || die "building Detectron2 failed (see the compiler output above): check the C++ compiler and torch, or see Detectron2's INSTALL.md"
            mkdir -p "$(dirname "$D2_CACHE")"
            rm -rf "$D2_CACHE.tmp$$" && mv "$D2_TMP" "$D2_CACHE.tmp$$" && rm -rf "$D2_CACHE" \
                && mv "$D2_CACHE.tmp$$" "$D2_CACHE"
            D2_WHEEL=$(ls "$D2_CACHE"/detectron2-*.whl | head -n 1)
            pip_install "${D2_ARGS[@]}" "$D2_WHEEL" \
                || die "installing the Detectron2 wheel $D2_WHEEL failed: see the pip output above"
        else
            pip_install --no-build-isolation "${D2_ARGS[@]}" "$D2_SRC" \
                || die "building Detectron2 failed (see the compiler output above): check the C++ compiler and torch, or see Detectron2's INSTALL.md"
        fi
        D2_VERSION=$(d2_check) \
            || die "Detectron2 was built but detectron2._C does not import: $(printf '%s' "$D2_VERSION" | tail -n 1). Rebuild with FORCE_DETECTRON2_BUILD=1 after fixing torch"
    fi
    note "Detectron2 $D2_VERSION installed and imports ($(py -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))'))"
else
    say "Detectron2 $D2_VERSION already installed and built against this torch: skipping the build"
    note "(FORCE_DETECTRON2_BUILD=1 rebuilds it)"
fi

# ---------------------------------------------------------------------------------------------
say "vfnet: pip install -e \".[dev]\" (this project, its dependencies and the test tools)"
# "setuptools<81" again: torch's own requirement (setuptools>=77 in recent releases) would
# otherwise upgrade an older one past 80.
pip_install -e ".[dev]" "setuptools<81" || die "installing this project failed: see the pip output above"
py -c 'import vfnet, detectron2' \
    || die "vfnet was installed but does not import: see the error above"

# ---------------------------------------------------------------------------------------------
if [[ -n "$PARITY_DIR" ]]; then
    say "Parity environment: virtualenv $PARITY_DIR that sees this environment's packages"
    "$PY" -m venv "$PARITY_DIR" || die "could not create the virtualenv $PARITY_DIR"
    PARITY_DIR=$(cd "$PARITY_DIR" && pwd)
    PPY=$PARITY_DIR/bin/python
    [[ -x "$PPY" ]] || die "$PPY is missing after 'python -m venv': remove $PARITY_DIR and run this again"
    PARITY_SITE=$("$PPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # The main environment's site directories, added with site.addsitedir so that their own
    # .pth files (the editable install of vfnet among them) are processed too; they come after
    # the parity environment's own site-packages, which so take precedence.
    py -c '
import os, site, sys, sysconfig
dirs = list(site.getsitepackages())
dirs += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
if site.ENABLE_USER_SITE:
    dirs.append(site.getusersitepackages())
seen = []
for d in dirs:
    if os.path.isdir(d) and d not in seen:
        seen.append(d)
print("# The main environment (%s): written by tools/install.sh --parity-env" % sys.prefix)
for d in seen:
    print("import site; site.addsitedir(%r)" % d)
' > "$PARITY_SITE/vfnet_main_environment.pth"
    note "$PARITY_SITE/vfnet_main_environment.pth adds:"
    grep '^import' "$PARITY_SITE/vfnet_main_environment.pth" | sed "s/^import site; site.addsitedir(\(.*\))$/      \1/"

    say "Parity environment: installing ${PARITY_PACKAGES[*]}"
    "$PPY" -m pip install --disable-pip-version-check "${PARITY_PACKAGES[@]}" \
        || die "installing MMDetection into $PARITY_DIR failed: see the pip output above"
    (cd / && "$PPY" -c 'import torch, detectron2, vfnet, mmdet, mmengine') \
        || die "$PPY cannot import torch, detectron2, vfnet, mmdet and mmengine: see the error above"
    note "$(cd / && "$PPY" -c 'import mmdet, vfnet, torch; print("mmdet %s, torch %s, vfnet from %s" % (mmdet.__version__, torch.__version__, vfnet.__path__[0]))')"
fi

# ---------------------------------------------------------------------------------------------
say "Done"
note "test: $PY -m pytest tests -q"
if [[ -n "$PARITY_DIR" ]]; then
    note "parity with MMDetection: $PARITY_DIR/bin/python -m pytest tests/parity -q"
fi
