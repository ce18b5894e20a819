# IPython kernel defaults of the kernelbox kernel image (/etc/ipython).
c = get_config()  # noqa: F821  (provided by traitlets when the file is loaded)

# Keep history in memory: a history SQLite on disk costs 1-3 ms per cell and is shared contention
# when kernels share it; %history and In/Out still work within one kernel run.
c.HistoryManager.hist_file = ":memory:"
