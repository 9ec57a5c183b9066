"""A sweep on a Ray cluster (``scripts/reproduce.py --address``); needs ``pip install -e '.[cluster]'``.

Each job (``sweep.Job``) is a Ray task holding ``threads`` CPUs (and a GPU on cuda). A job that
starts from a pretrained baseline takes the baseline task's final checkpoint as an argument (an
object reference), so Ray runs it after the baseline, which is trained once. MNIST is read and
verified once, by the driver, and reaches the workers through the object store as uint8
pixels. Nothing assumes a shared file system: a worker trains in a scratch folder of its own
(removed when the task ends), and hands every checkpoint, tuned proposal, evaluation and log
line to ``RunStore``, an actor on the driver's node. The driver takes them from it and writes them into
the runs directory through ``runs.Run`` (atomic writes, the runs' locks held by the driver), and
only then lets the worker go on, so a worker that dies loses nothing the driver has: Ray runs the
task again and it resumes from the store's last checkpoint, exactly (``train`` restores the
RNG state and the batch order). A job takes along the run's tuned proposal and is asked only
for the evaluations the driver does not have yet (a finished run's saved ones are reused there).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import tempfile
from contextlib import ExitStack, contextmanager, redirect_stderr
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import ray
from ray.exceptions import RayError, TaskCancelledError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .console import console
from .data import images_from_pixels, split_pixels
from .runs import Run, RunError, load_checkpoint_file
from .sweep import Interrupted, Job, run_job, saved_evaluation, wanted

MAX_RETRIES = 3  # a task whose worker or node dies is run again this often
CONNECT_SECONDS = 5  # to reach a cluster's address, and the GCS's tries to answer
_SCRATCH = "pyro-cvae-job-"
TOKEN_HELP = (
    "set RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN "
    "(on the head node: ray get-auth-token)"
)


class ClusterError(RuntimeError):
    """The cluster cannot be reached, refuses us, or cannot run the jobs; one line says why."""


# ---------------------------------------------------------------------------------------------
# Connecting


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``) as
    its driver, or raise ``ClusterError`` within seconds: no cluster there, a refused token,
    a missing Ray Client."""
    host_port = address.removeprefix("ray://")
    if address != "auto":
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit():
            raise ClusterError(
                f"--address {address}: expected auto, HOST:PORT (the head's GCS port, 6379 by "
                "default) or ray://HOST:10001."
            )
        try:  # Ray itself retries an unreachable address for minutes
            socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS).close()
        except OSError as e:
            raise ClusterError(
                f"no Ray cluster answers at {host_port} ({e.strerror or type(e).__name__}); start "
                "one with `ray start --head` there, or check the address and port."
            ) from None
    # the GCS's answer comes at once; without this, a refused token is retried for 20 s
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(CONNECT_SECONDS))
    # Ray's C++ client logs every failed try on stderr; our one line says what failed
    with open(os.devnull, "w") as quiet, _stderr_to(quiet):
        try:
            ray.init(
                address=address,
                log_to_driver=False,
                logging_level="ERROR",
                configure_logging=False,
            )
        except ConnectionError as e:
            cause = f"{e} {e.__cause__ or ''}"
            if "InvalidAuthToken" in cause or "Unauthenticated" in cause:
                raise ClusterError(
                    f"the Ray cluster at {host_port} refused this driver: it wants its token; "
                    f"{TOKEN_HELP}."
                ) from None
            raise ClusterError(
                f"cannot join a Ray cluster at {address} ({e}); start one with `ray start --head`"
                f" or pass its address (HOST:6379). If it uses token authentication, {TOKEN_HELP}."
            ) from None
        except ValueError as e:  # ray:// without Ray Client installed, among others
            raise ClusterError(f"--address {address}: {e}") from None


@contextmanager
def _stderr_to(stream) -> Iterator[None]:
    """Point file descriptor 2 (where C++ libraries write) and ``sys.stderr`` at ``stream``."""
    saved = os.dup(2)
    try:
        os.dup2(stream.fileno(), 2)
        with redirect_stderr(stream):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_resources(threads: int, gpu: bool) -> None:
    """A job must fit on one node: Ray would wait for such a node for ever, silently."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need = {"CPU": threads, **({"GPU": 1} if gpu else {})}
    if any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        return
    cpus = max((int(n.get("CPU", 0)) for n in nodes), default=0)
    gpus = max((int(n.get("GPU", 0)) for n in nodes), default=0)
    wants = f"{threads} CPUs" + (" and a GPU" if gpu else "")
    has = f"{cpus} CPUs" + (f" and {gpus} GPUs" if gpu else "")
    fix = f"pass --threads {cpus} or fewer" if cpus and cpus < threads else "add such a node"
    if gpu and not gpus:
        fix = "add a node with a GPU or pass --device cpu"
    raise ClusterError(
        f"no node of the Ray cluster has {wants} for a job (the largest has {has}); {fix}."
    )


# ---------------------------------------------------------------------------------------------
# The run store: what the workers hand to the driver


class RunStore:
    """An actor on the driver's node: the workers' checkpoints, tuned proposals, evaluations and
    log lines wait here until the driver has written them (``take``, then ``written``); the last
    checkpoint of each run stays, for a task that Ray runs again after its worker died, and so
    does its last tuned proposal."""

    def __init__(self):
        self._latest: dict[str, dict] = {}
        self._tuned: dict[str, dict] = {}
        self._outbox: list[tuple] = []
        self._waiting: dict[int, asyncio.Event] = {}
        self._count = 0

    async def resume_from(self, name: str, checkpoint: dict) -> None:
        self._latest[name] = checkpoint

    async def latest(self, name: str) -> dict | None:
        return self._latest.get(name)

    async def tuned(self, name: str) -> dict | None:
        return self._tuned.get(name)

    async def hand(self, name: str, kind: str, payload, where: dict, wait: bool = True) -> None:
        """Queue a ``checkpoint``, ``tuned`` proposal, ``evaluation`` or ``log`` line of run
        ``name``; with ``wait``, return once the driver has written it."""
        self._count += 1
        if kind == "checkpoint":
            self._latest[name] = payload
        elif kind == "tuned":
            self._tuned[name] = payload
        self._outbox.append((self._count, name, kind, payload, where))
        if wait:
            event = self._waiting[self._count] = asyncio.Event()
            await event.wait()

    async def take(self) -> list[tuple]:
        out, self._outbox = self._outbox, []
        return out

    async def written(self, ids: list[int]) -> None:
        for i in ids:
            event = self._waiting.pop(i, None)
            if event is not None:
                event.set()

    async def forget(self, name: str) -> None:
        self._latest.pop(name, None)
        self._tuned.pop(name, None)


# ---------------------------------------------------------------------------------------------
# A job on a worker


def _where() -> dict:
    context = ray.get_runtime_context()
    return {
        "host": socket.gethostname(),
        "ip": ray.util.get_node_ip_address(),
        "node": context.get_node_id(),
        "pid": os.getpid(),
    }


def _scratch() -> Path:
    """A folder of this task's own, after removing those of tasks whose process died (killed
    before they could remove theirs)."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{_SCRATCH}*"):
        match = re.fullmatch(rf"{_SCRATCH}(\d+)-.*", old.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_SCRATCH}{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_task(
    job: Job,
    evaluations: list[dict],
    threads: int,
    re_evaluate: bool,
    device: str,
    store,
    train_pixels,
    test_pixels,
    baseline_checkpoint: dict | None,
    gives_baseline: bool,
    tuned: dict | None = None,
) -> tuple[dict, dict | None]:
    """Run ``job`` on this worker (a Ray task), with the driver's copy of its tuned proposal
    (``tuned``, if any): its result, and its final checkpoint when other jobs start from it
    (``gives_baseline``)."""
    where = _where()
    if job.baseline is not None and baseline_checkpoint is None:
        return {"error": "its pretrained baseline failed", "evaluations": [], "where": where}, None
    scratch = _scratch()
    try:
        runs_dir = scratch / "runs"
        run = Run(runs_dir / job.run_dir.name)
        run.path.mkdir(parents=True)
        latest = ray.get(store.latest.remote(job.name))
        if latest is not None:  # resume where the driver's copy of the run is
            run.write_checkpoint(latest)
        # the one a worker of this job fitted before it died, else the driver's
        tuned = ray.get(store.tuned.remote(job.name)) or tuned
        if tuned is not None:  # kept if fitted to that checkpoint, fitted again if void
            run.write_tuned_proposal(tuned)
        baseline = None
        if job.baseline is not None:
            baseline = runs_dir / job.baseline.name
            baseline.mkdir(parents=True, exist_ok=True)
            Run(baseline).write_checkpoint(baseline_checkpoint)

        def hand(kind: str, payload, wait: bool = True) -> None:
            ray.get(store.hand.remote(job.name, kind, payload, where, wait))

        images = {
            "train": images_from_pixels(train_pixels),
            "test": images_from_pixels(test_pixels),
        }
        try:
            out = run_job(
                replace(job, run_dir=run.path, baseline=baseline),
                evaluations,
                runs_dir,
                threads=threads,
                re_evaluate=re_evaluate,
                device=device,
                images=images,
                # named as the driver names them, not by this worker's scratch folders
                log=lambda line: hand("log", _as_driver(line, run, job, baseline), wait=False),
                on_checkpoint=lambda state: hand("checkpoint", state),
                on_evaluation=lambda record, limit: hand("evaluation", (record, limit)),
                on_tuned=lambda state: hand("tuned", state),
            )
        except Interrupted as e:
            return {"error": str(e), "interrupted": True, "evaluations": [], "where": where}, None
        except Exception as e:  # reported in the table; the sweep goes on with the other runs
            hand("log", f"failed: {type(e).__name__}: {e}", wait=False)
            return {"error": f"{type(e).__name__}: {e}", "evaluations": [], "where": where}, None
        out["where"] = where
        return out, (run.read_checkpoint() if gives_baseline else None)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _as_driver(line: str, run: Run, job: Job, baseline: Path | None) -> str:
    line = line.replace(str(run.path), str(job.run_dir))
    return line.replace(str(baseline), str(job.baseline)) if baseline is not None else line


# ---------------------------------------------------------------------------------------------
# The driver


def run_on_ray(
    jobs: list[Job],
    evaluations: list[dict],
    runs_dir: Path,
    data_dir: str | None = None,
    threads: int = 1,
    re_evaluate: bool = False,
    device: str = "cpu",
    log: Callable[[str], None] = lambda line: console.print(line, markup=False, highlight=False),
    on_saved: Callable[[Job, dict, dict], None] | None = None,
) -> tuple[dict[str, dict], int | None]:
    """Run ``jobs`` (baselines before the jobs that start from them) on the connected cluster.
    Returns each job's result by name, and the signal that stopped the sweep (None: it ran to
    the end). ``on_saved(job, checkpoint, where)`` is called on the driver after each
    checkpoint is written, before its worker goes on."""
    check_resources(threads, device == "cuda")
    here = ray.get_runtime_context().get_node_id()
    store = (
        ray.remote(RunStore)
        .options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=True),
        )
        .remote()
    )
    # MNIST, read and verified once here, as uint8: a quarter of the float images
    train_pixels = ray.put(split_pixels("train", data_dir))
    test_pixels = ray.put(split_pixels("test", data_dir))
    task = ray.remote(job_task)
    resources = dict(
        num_cpus=threads,
        num_gpus=1 if device == "cuda" else 0,
        max_retries=MAX_RETRIES,
        num_returns=2,
    )
    bases = {job.baseline for job in jobs if job.baseline is not None}
    results: dict[str, dict] = {}
    pending: dict = {}  # result reference -> job
    checkpoints: dict[Path, object] = {}  # baseline run -> reference to its final checkpoint
    stopped: list[int] = []

    def write(items: list[tuple]) -> None:
        done = []
        for msg_id, name, kind, payload, where in items:
            job = next(j for j in jobs if j.name == name)
            run = Run(job.run_dir)
            if kind == "log":
                with open(run.sweep_log_path, "a") as f:
                    f.write(payload + "\n")
            elif kind == "checkpoint":
                run.write_checkpoint(payload)
                log(_progress_line(job, payload, where))
                if on_saved is not None:
                    on_saved(job, payload, where)
            elif kind == "tuned":
                run.write_tuned_proposal(payload)
            else:
                record, limit = payload
                record = {**record, "run_dir": str(run.path)}
                record.pop("path", None)
                record["path"] = str(run.write_evaluation(record, limit))
            results.setdefault(name, {}).setdefault("ran_on", [])
            place = _place(where)
            if place not in results[name]["ran_on"]:
                results[name]["ran_on"].append(place)
            done.append(msg_id)
        if done:
            ray.get(store.written.remote(done))

    with ExitStack() as held, _signals_to(stopped):
        for job in jobs:
            run = Run(job.run_dir)
            if run.is_finished() and not re_evaluate and _evaluated(run, job, evaluations):
                results[job.name] = {
                    "run_dir": str(run.path),
                    "evaluations": [
                        saved_evaluation(run, job, ev) for ev in wanted(job, evaluations)
                    ],
                    "ran_on": [],
                }
                if job.run_dir in bases:
                    checkpoints[job.run_dir] = ray.put(run.read_checkpoint())
                log(f"{job.name}: finished and evaluated before; nothing to do")
                continue
            held.enter_context(run.lock())  # the driver holds the run while a worker trains it
            if run.exists():
                ray.get(store.resume_from.remote(job.name, run.read_checkpoint()))
            baseline = checkpoints.get(job.baseline) if job.baseline is not None else None
            if job.baseline is not None and baseline is None:
                baseline = ray.put(None)  # not in this sweep: cannot happen with planned jobs
            result, checkpoint = task.options(name=job.name, **resources).remote(
                job,
                _to_do(run, job, evaluations, re_evaluate),
                threads,
                re_evaluate,
                device,
                store,
                train_pixels,
                test_pixels,
                baseline,
                job.run_dir in bases,
                _tuned_state(run),
            )
            pending[result] = job
            checkpoints[job.run_dir] = checkpoint
        cancelled = False
        while pending:
            if stopped and not cancelled:
                cancelled = True  # each worker stops after its step and saves, as on Ctrl-C
                for ref in pending:
                    ray.cancel(ref)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            write(ray.get(store.take.remote()))
            for ref in ready:
                job = pending.pop(ref)
                result = _result(ref, job)
                if "error" not in result:  # the worker's paths were its scratch: the driver's copy
                    run = Run(job.run_dir)
                    result["run_dir"] = str(run.path)
                    result["evaluations"] = [
                        saved_evaluation(run, job, ev) for ev in wanted(job, evaluations)
                    ]
                results.setdefault(job.name, {}).update(result)
                ray.get(store.forget.remote(job.name))
                error = results[job.name].get("error")
                log(f"{job.name}: {'failed: ' + error if error else 'done'}")
        write(ray.get(store.take.remote()))
    return results, (stopped[0] if stopped else None)


def _result(ref, job: Job) -> dict:
    try:
        return ray.get(ref)
    except TaskCancelledError:
        return {"error": "stopped before it finished", "interrupted": True, "evaluations": []}
    except RayError as e:  # retries spent, or its baseline's task failed for good
        cause = getattr(e, "cause", None) or e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        what = f"{type(cause).__name__}: {first}"
        if job.baseline is not None and "baseline" not in what:
            what = f"its pretrained baseline failed ({what})"
        return {"error": what, "evaluations": []}


def _evaluated(run: Run, job: Job, evaluations: list[dict]) -> bool:
    return all(saved_evaluation(run, job, ev) is not None for ev in wanted(job, evaluations))


def _to_do(run: Run, job: Job, evaluations: list[dict], re_evaluate: bool) -> list[dict]:
    """The evaluations a worker is asked for: those of a finished run that the driver does not
    have (the worker's scratch folder holds none), all of them while training will change it."""
    if re_evaluate or not run.is_finished():
        return evaluations
    return [ev for ev in wanted(job, evaluations) if saved_evaluation(run, job, ev) is None]


def _tuned_state(run: Run) -> dict | None:
    """The driver's copy of the run's tuned proposal, for its worker (None: none readable)."""
    if not run.tuned_proposal_path.is_file():
        return None
    try:
        return load_checkpoint_file(run.tuned_proposal_path)
    except RunError:  # unreadable: the worker fits another if one is asked for
        return None


def _place(where: dict) -> str:
    return f"{where['host']} ({where['ip']}, node {where['node'][:8]})"


def _progress_line(job: Job, state: dict, where: dict) -> str:
    on = f"on {where['host']} ({where['ip']}, node {where['node'][:8]}, pid {where['pid']})"
    if state.get("batch"):  # stopped inside an epoch
        return f"{job.name}: stopped in epoch {state['epoch'] + 1} at step {state['step']}, saved; {on}"
    record = state["metrics"][-1] if state.get("metrics") else {}
    return (
        f"{job.name}: epoch {state['epoch']}/{job.config.epochs}, loss {record.get('loss', float('nan')):.3f}, "
        f"{record.get('steps_per_s', 0):.1f} steps/s, {on}"
    )


@contextmanager
def _signals_to(stopped: list[int]) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, a scheduler, a closed terminal) are noted in
    ``stopped`` for the loop to pass on; a second one stops at once."""

    def note(signum, frame):
        if stopped:
            raise KeyboardInterrupt
        stopped.append(signum)

    kinds = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {kind: signal.signal(kind, note) for kind in kinds}
    try:
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler)
