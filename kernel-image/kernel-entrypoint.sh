#!/bin/sh
# Starts the Jupyter kernel of a kernelbox container (run by tini, which stays PID 1).
#
# The root filesystem is read-only at run time, so everything the kernel writes goes to the
# per-container tmpfs /tmp: the home's ~/.cache, ~/.config, ~/.local and ~/.ipython are symlinks
# into /tmp/kernelbox (created here), and matplotlib's config/cache dir (MPLCONFIGDIR) is seeded
# with the font cache built into the image (rebuilding it costs seconds). Then exec, so python is
# tini's direct child and receives the signals tini forwards (SIGINT interrupts a cell).
set -e
state=/tmp/kernelbox
if [ ! -e "$state/matplotlib" ]; then
    mkdir -p "$state/cache" "$state/config" "$state/local" "$state/ipython"
    cp -R /opt/kernelbox/seed/matplotlib "$state/matplotlib"
fi
exec /opt/venv/bin/python -m ipykernel_launcher "$@"
