# The program of a warm sandbox (`python -u -c` this, after a line binding PRIOR):
# start-up is done and PRIOR imported; then it says so (one byte, "R") on stdin, a
# socket, and waits there for one run:
#   working directory NUL file name NUL (name NUL value NUL)*
# with, on its first bytes, the run's own stdout and stderr pipes (SCM_RIGHTS; a run
# fed at once keeps the ones it started with). It runs it exactly as `python -u FILE`
# in that directory with that environment would: the interpreter's own code path for a
# script file (PyRun_SimpleFileExFlags), so `__main__`, `__file__`, tracebacks,
# SystemExit and KeyboardInterrupt are those of a cold start. When the run had its own
# pipes, its exit code is written back on the socket as the process ends (decimal,
# then a newline).
# Nothing of this program stays visible to the run's code but its frame below the
# script's (and /proc/self/cmdline).
def _stoa_warm():
    import os
    import sys

    prior = PRIOR
    for m in prior:
        try:
            __import__(m)
        except BaseException:
            pass  # imported again below, after the run's directory is on sys.path
    before = set(sys.modules)
    import _socket
    import atexit
    import ctypes
    import gc

    ours = set(sys.modules) - before
    run_file = ctypes.pythonapi.PyRun_SimpleFileExFlags
    run_file.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
    run_file.restype = ctypes.c_int
    fopen = ctypes.CDLL(None).fopen
    fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    fopen.restype = ctypes.c_void_p

    # Off fd 0 (which becomes /dev/null) and out of what the run executes.
    sock = _socket.socket(fileno=os.dup(0))
    try:
        sock.send(b"R")
    except OSError:
        pass  # a run fed at once: nobody waits for it
    chunks, fds = [], []
    while True:
        try:
            b, anc, _, _ = sock.recvmsg(1 << 16, _socket.CMSG_SPACE(32), _socket.MSG_CMSG_CLOEXEC)
        except OSError:
            b, anc = b"", []
        for level, kind, data in anc:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                fds += [int.from_bytes(data[i:i + 4], sys.byteorder) for i in range(0, len(data) - 3, 4)]
        if not b:
            break
        chunks.append(b)
    if not chunks:
        os._exit(0)  # the pool let it go without a run
    fields = [os.fsdecode(f) for f in b"".join(chunks).split(b"\0")]
    wd, name, env = fields[0], fields[1], fields[2:]
    report = len(fds) == 2
    if report:
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
    for f in fds:
        os.close(f)

    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    # stdin as the interpreter makes it at start-up for /dev/null (what it learnt of
    # the pipe, such as seekable, would stay otherwise).
    import io

    old = sys.stdin
    raw = io.FileIO(0, "r", closefd=False)
    raw.name = "<stdin>"
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(
        io.BufferedReader(raw), encoding=old.encoding, errors=old.errors,
        line_buffering=old.line_buffering,
    )
    os.environ.clear()
    for i in range(0, len(env) - 1, 2):
        os.environ[env[i]] = env[i + 1]
    os.chdir(wd)
    path = os.path.join(wd, name)
    # As `python -u NAME` with PYTHONPATH=wd: the script's directory (not with
    # PYTHONSAFEPATH, which -c honoured too), then PYTHONPATH.
    if sys.flags.safe_path:
        sys.path.insert(0, wd)
    else:
        sys.path[0] = os.path.dirname(path)
        sys.path.insert(1, wd)
    sys.argv[:] = [name]
    sys.orig_argv[:] = [sys.orig_argv[0], "-u", name]
    main = sys.modules["__main__"].__dict__
    keep = ("__name__", "__doc__", "__package__", "__loader__", "__spec__", "__builtins__")
    for k in [k for k in main if k not in keep]:
        del main[k]
    main["__annotations__"] = {}
    for m in prior:
        main[m.split(".")[0]] = __import__(m)
    for m in ours:
        sys.modules.pop(m, None)
    path = os.fsencode(path)

    def flushed():
        # The standard streams flushed as at exit: False when stdout could not be.
        ok = True
        for f in (sys.stdout, sys.stderr):
            try:
                if f is not None and not getattr(f, "closed", False):
                    f.flush()
            except BaseException:
                ok = ok and f is not sys.stdout
        return ok

    # What exists now is never garbage the run can make: the collection at its end
    # looks only at what the run made.
    gc.freeze()
    failed = run_file(fopen(path, b"rb"), path, 1, None)
    # An uncaught KeyboardInterrupt is left to the interpreter, which exits by SIGINT
    # (SystemExit already exited inside, through the interpreter's own shutdown).
    if failed and issubclass(getattr(sys, "last_type", type(None)), KeyboardInterrupt):
        return
    # The script ended, or raised (exit 1, as a cold start). What the interpreter's
    # shutdown does that code can see, in its order: the threads that are not daemons
    # joined, the atexit functions, __main__ cleared (its objects finalised), the
    # cycles collected, the standard streams flushed. Freeing the rest is left to the
    # kernel: this process ends here, and the sandbox with it.
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    atexit._run_exitfuncs()
    code = 1 if failed else 0
    if not flushed():
        code = 120
    # As the interpreter clears a module: names with one underscore first.
    for k in [k for k in main if k.startswith("_") and not k.startswith("__")]:
        main[k] = None
    for k in [k for k in main if k != "__builtins__"]:
        main[k] = None
    gc.collect()
    if not flushed():
        code = 120
    if report:
        try:
            sock.send(b"%d\n" % code)
        except OSError:
            pass  # the worker learns it from the process's end instead
        # The run's output ends here, not once this process's memory is given back.
        for fd in (1, 2):
            try:
                os.close(fd)
            except OSError:
                pass
    os._exit(code)


_stoa_warm()
