#!/bin/sh
# Turns a Debian root with the packages of packages.txt into the kernelbox kernel image.
# Runs as root INSIDE the target root (a chroot for build.sh, a RUN step for the Dockerfile),
# with the kernel-image directory at $1. Network is needed only for pip (PyPI).
set -eu
src=${1:?usage: setup-rootfs.sh <kernel-image dir>}

# The kernel user: uid 1000 with a real home; the working dir is mounted at run time.
useradd --uid 1000 --user-group --create-home --shell /bin/bash kernel
install -d -o 1000 -g 1000 -m 0755 /home/kernel/work
install -d -m 0755 /run/kernelbox
# The home is read-only at run time: its usual writable dirs point into the tmpfs /tmp.
for d in cache config local ipython; do
    ln -s "/tmp/kernelbox/$d" "/home/kernel/.$d"
    chown -h 1000:1000 "/home/kernel/.$d"
done

# Python packages: wheels only, pinned.
python3 -m venv /opt/venv
/opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-input \
    --only-binary :all: -r "$src/requirements.txt"

# SIGINT to the thread running user code (see sitecustomize.py).
install -m 0644 "$src/sitecustomize.py" \
    "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/sitecustomize.py"

install -m 0755 "$src/kernel-entrypoint.sh" /usr/local/bin/kernelbox-kernel
install -D -m 0644 "$src/matplotlibrc" /etc/kernelbox/matplotlibrc
install -D -m 0644 "$src/ipython_kernel_config.py" /etc/ipython/ipython_kernel_config.py

# Trim what a kernel never reads (keep __pycache__: without it first imports take seconds).
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/* \
    /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/lintian /root/.cache
find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
find /opt/venv/lib -depth -type d \( -name tests -o -name test \) -path '*/site-packages/*' \
    -exec rm -rf {} +

# Byte-compile everything the kernel may import; the root is read-only at run time.
/opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib /usr/lib/python3.11 >/dev/null 2>&1 || true

# Seed matplotlib's font cache (copied to tmpfs at container start) and prove the CJK font is in it.
install -d -m 0755 /opt/kernelbox/seed/matplotlib
MPLCONFIGDIR=/opt/kernelbox/seed/matplotlib MATPLOTLIBRC=/etc/kernelbox/matplotlibrc MPLBACKEND=agg \
    /opt/venv/bin/python -c "
import matplotlib.pyplot
from matplotlib import font_manager
font_manager.findfont('WenQuanYi Micro Hei', fallback_to_default=False)
"
chmod -R a+rX /opt/kernelbox
