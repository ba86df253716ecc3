"""Optional Weights & Biases logging, as a training-loop hook.

``WandbLogger(config, workdir)`` is called with the trainer's ``StepInfo`` after the
built-in hooks, at every step, task start and task end, and sends ``info.logged`` (the
scalars that went to ``metrics.jsonl`` and TensorBoard at that event) to wandb at step
``info.global_step``: the numbers only, as TensorBoard gets them (bools, strings such as
``"task"`` and the ``"step"`` key stay out). Settings live in ``config.logging``
(``default_config()``; checked by ``check(config)``); ``wandb`` is imported only when a
logger is made, so the package is needed only for runs with ``logging.wandb=True``:

    pip install 'cpt_jax[wandb]'
    python scripts/train.py ... --config.logging.wandb=True --config.logging.project=NAME

wandb's files go to ``WORKDIR/wandb``; an offline run (``logging.mode=offline``, or
``WANDB_MODE=offline`` with ``logging.mode=''``) is uploaded later with ``wandb sync``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import numbers
import os
import re
import secrets
import string
import sys

import ml_collections

from cpt_jax import atomic

ID_FILE = "wandb_id"
MODES = ("", "online", "offline", "disabled")
INSTALL_HINT = "logging.wandb=True needs the wandb package: pip install 'cpt_jax[wandb]'"
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PROJECT_BAD = set("/\\#?%:")

_log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """``config.logging``: whether to log to wandb, and where."""
    c = ml_collections.ConfigDict()
    c.wandb = False       # make a WandbLogger (needs the wandb package)
    c.project = "cpt_jax"
    c.entity = ""         # "" = wandb's default entity (WANDB_ENTITY, or the user's)
    c.name = ""           # "" = the workdir's basename
    # "online", "offline" (upload later with `wandb sync`), "disabled" (log nothing), or
    # "" = wandb's own choice (WANDB_MODE, `wandb offline`, else online)
    c.mode = ""
    # strings; a tuple, as ml_collections' flags override tuples (not lists):
    # --config.logging.tags="('replay','99m')" or --config.logging.tags=replay (one)
    c.tags = ()
    # on resuming from a checkpoint, rewind the wandb run to the checkpoint's step (the
    # killed attempt's later rows are replaced); False: resume="allow" (for servers
    # without rewinding; see WandbLogger)
    c.rewind = True
    return c


def _fail(message: str):
    raise ValueError(message)


def check(config) -> None:
    """Reject bad ``config.logging`` values (the run config, or its ``logging`` part) with
    one line naming the key and the fix. With ``logging.wandb=True`` the wandb package must
    be importable."""
    lg = config.logging if "logging" in config else config
    known = set(default_config())
    unknown = sorted(set(lg) - known)
    if unknown:
        _fail(f"logging.{unknown[0]} is not a logging key: use one of {sorted(known)}")
    for key in ("wandb", "rewind"):
        if not isinstance(lg[key], bool):
            _fail(f"logging.{key}={lg[key]!r}: use True or False")
    if lg.mode not in MODES:
        _fail(f"logging.mode={lg.mode!r}: use 'online', 'offline' or 'disabled' "
              "(or '' for WANDB_MODE, else online)")
    project = lg.project
    if not isinstance(project, str) or not project or len(project) > 128 or (
            _PROJECT_BAD & set(project)):
        _fail(f"logging.project={project!r}: use a name of 1 to 128 characters without "
              f"any of {''.join(sorted(_PROJECT_BAD))}")
    for key in ("entity", "name"):
        if not isinstance(lg[key], str):
            _fail(f"logging.{key}={lg[key]!r}: use a string ('' for the default)")
    tags = lg.tags
    if not isinstance(tags, (list, tuple)) or not all(
            isinstance(t, str) and 0 < len(t) <= 64 for t in tags):
        _fail(f"logging.tags={tags!r}: use strings of 1 to 64 characters, e.g. "
              "--config.logging.tags=\"('replay','99m')\"")
    if lg.wandb and lg.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        _fail(INSTALL_HINT)


def _new_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_run_id(workdir: str) -> str | None:
    """The wandb run id stored in ``workdir`` (None if there is none, or it is unreadable)."""
    try:
        with open(os.path.join(workdir, ID_FILE)) as f:
            run_id = f.read().strip()
    except OSError:
        return None
    return run_id if _ID_RE.fullmatch(run_id) else None


def wandb_scalars(logged) -> dict:
    """The entries of ``logged`` that TensorBoard gets: real numbers, not bools; no "step"."""
    return {k: v for k, v in logged.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class WandbLogger:
    """A training-loop hook that sends the logged scalars to a wandb run.

    ``logger(info)`` logs ``wandb_scalars(info.logged)`` at step ``info.global_step`` (one
    history row per step: the scalars of a step's events, e.g. the training scalars and
    the task end's ``eval/*`` losses, are merged); an event with nothing logged costs a
    dict check. ``close()`` finishes the run (the trainer calls it at the end, also on
    errors). The run's config is the run config as JSON (``to_json_best_effort``).

    Resuming. The run id is stored in ``WORKDIR/wandb_id`` (written atomically), so a
    restarted run continues the same wandb run. ``resume_step`` has the meaning of
    ``MetricsLogger``'s: None for a fresh run (a new id, replacing any stored one); else
    the first step this attempt logs again (the checkpoint's step + 1). wandb keeps a
    run's history steps increasing and refuses a step lower than the last one logged,
    while the killed attempt may have logged past its last checkpoint. So, as
    metrics.jsonl drops those lines and TensorBoard purges those events, a resumed logger
    *rewinds* the run (``logging.rewind=True``, the default):
    ``wandb.init(resume_from=f"{id}?_step={resume_step - 1}")`` (wandb >= 0.17.1) keeps
    the history through step ``resume_step - 1``, drops the killed attempt's later rows
    and continues at ``resume_step``. In offline mode the rewind point is written into the
    new offline run (the run record's ``branch_point``) and done by ``wandb sync``, which
    uploads the offline runs of one id in the order they started. Rewinding is a W&B
    server feature (in preview; not on every server): if ``wandb.init`` refuses it, the
    logger warns and resumes with ``id=..., resume="allow"``, as it does with
    ``logging.rewind=False`` (the choice for offline runs synced to such a server). Then
    the steps the killed attempt logged keep its values (the same ones, up to timings, as
    a run resumes bit-exactly), and this attempt's scalars below the run's starting step
    (which wandb reports online) are skipped without wandb's per-step warning. Scalars
    below ``resume_step`` (e.g. of a task start at the checkpoint's own step) are always
    skipped: the killed attempt logged them.

    Args:
      config: the run config; settings from ``config.logging`` (see ``default_config``).
      workdir: the run directory; wandb's files go to ``WORKDIR/wandb``.
      resume_step: see above.
      active: False makes every call a no-op, as does ``logging.mode='disabled'``
        (no import of wandb, no file written).
    """

    def __init__(self, config, workdir: str, *, resume_step: int | None = None,
                 active: bool = True):
        self.workdir = workdir
        self.run = None
        self.run_id: str | None = None  # kept after close()
        self.first_step = 0
        lg = config.logging
        mode = lg.mode or os.environ.get("WANDB_MODE", "")
        self.active = bool(active) and mode != "disabled"
        if not self.active:
            return
        try:
            import wandb
        except ImportError:
            raise ImportError(INSTALL_HINT) from None
        run_id = read_run_id(workdir) if resume_step is not None else None
        rewind = run_id is not None and resume_step > 0 and lg.rewind
        if run_id is None:  # stored before the run starts: a resume finds it in any case
            run_id = _new_id()
            atomic.write_text(os.path.join(workdir, ID_FILE), run_id + "\n")
        kwargs = dict(
            project=lg.project, entity=lg.entity or None,
            name=lg.name or os.path.basename(os.path.abspath(workdir)),
            tags=list(lg.tags) or None, mode=lg.mode or None, dir=workdir,
            config=json.loads(config.to_json_best_effort()))
        run = None
        if rewind:
            try:
                run = wandb.init(resume_from=f"{run_id}?_step={resume_step - 1}", **kwargs)
            except Exception as e:  # e.g. a server without rewinding
                _log.warning("wandb could not rewind run %s to step %d (%s); resuming it "
                             "without a rewind", run_id, resume_step - 1, e)
        if run is None:
            run = wandb.init(id=run_id, resume="allow", **kwargs)
        if getattr(run, "disabled", False):  # disabled by wandb's own settings
            run.finish()
            self.active = False
            return
        self.run, self.run_id = run, run.id
        self.first_step = max(int(run.starting_step or 0), resume_step or 0)

    def __call__(self, info) -> None:
        if self.run is None or not info.logged or info.global_step < self.first_step:
            return
        values = wandb_scalars(info.logged)
        if values:
            self.run.log(values, step=int(info.global_step))

    def close(self, exit_code: int | None = None) -> None:
        """Finish the run (flushing its last row); later calls do nothing. Called while an
        exception propagates (the trainer's ``finally``), the run is marked failed unless
        ``exit_code`` is given; wandb's own errors here are warnings, not raised."""
        run, self.run = self.run, None
        if run is None:
            return
        if exit_code is None:
            exc = sys.exc_info()[1]
            exit_code = 0 if exc is None else 1
            if isinstance(exc, SystemExit):
                exit_code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:  # an upload error must not hide the run's own outcome
            _log.warning("wandb could not finish run %s: %s", self.run_id, e)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(exit_code=0 if exc_type is None else 1)
