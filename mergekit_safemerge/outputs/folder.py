"""Output folders that never lose a user's data: checked, locked, written aside, published whole.

A run writes into a fresh staging folder next to the destination and moves its files into place
only when everything succeeded; on any failure (an error, Ctrl-C, SIGTERM) it removes the
staging folder and nothing else. Around that:

* the destination must not be a file, a dangling link, or overlap an input folder (be, contain
  or sit inside a model or adapter the run reads);
* one output kind per folder (:class:`OutputKind`: a merged model, an adapter, a scan, demo
  models, a safety LoRA): an existing destination may hold an earlier output of the same kind,
  listed in its manifest (the ``files`` of ``safemerge_report.json`` / ``scan.json`` /
  ``demo_models.json`` / ``safety_lora_report.json``), which is replaced as a whole so no stale
  shard survives, and files that no output would write
  (a log, notes), which are left alone; an output of another kind, or anything else that looks
  like an output (``config.json``, weights, a model card), stops the run before any tensor is
  read;
* one run at a time per destination: an exclusive lock on ``.<name>.safemerge.lock`` next to it
  (released by the kernel if the process dies); a staging folder left by a killed run is removed
  by the next run that holds the lock;
* :meth:`OutputFolder.publish` writes the manifest itself, last, listing every staged file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergekit_safemerge.errors import SafeMergeError

STAGING_MARK = ".safemerge-staging"
"""A file in every staging folder, so that only our own leftovers are ever removed."""

MODEL_OUTPUT_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "*.bin", "*.index.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "README.md", "mergekit_config.yml", "safemerge_report.json",
    "adapter_config.json", "adapter_model.*", "*.pt", "*.py",
)  # fmt: skip
"""Names a merge (model or adapter) may write; such a file not written by SafeMERGE is foreign."""


@dataclass(frozen=True)
class OutputKind:
    """What a command writes into its folder: the manifest that lists the files (its JSON
    ``format``, and ``output`` for kinds that share a format), the names it may write, and
    which command writes it (for messages)."""

    name: str
    manifest: str
    format: str
    command: str
    patterns: tuple[str, ...] = MODEL_OUTPUT_PATTERNS
    output: str | None = None
    dependents: tuple[tuple[str, str], ...] = ()
    """Files other commands write about this output (name, format): they describe the output
    they sit beside, so they go with it when it is replaced (never presented as current)."""

    def owns(self, document: Mapping[str, Any]) -> bool:
        """Whether a manifest document is one of this kind (a v2 report without ``output`` is a
        merged model)."""
        if document.get("format") != self.format:
            return False
        return self.output is None or document.get("output", MODEL.output) == self.output


REPORT_FILE = "safemerge_report.json"
EVAL_FILE = ("safemerge_eval.json", "safemerge-eval")
MODEL = OutputKind(
    "merged model",
    REPORT_FILE,
    "safemerge-report",
    "mergekit-yaml",
    output="model",
    dependents=(EVAL_FILE,),
)
ADAPTER = OutputKind(
    "adapter",
    REPORT_FILE,
    "safemerge-report",
    "safemerge adapter",
    output="adapter",
    dependents=(EVAL_FILE,),
)
SCAN = OutputKind("scan", "scan.json", "safemerge-scan", "safemerge scan", patterns=("scan.*",))
DEMO_MODELS = OutputKind(
    "set of demo models",
    "demo_models.json",
    "safemerge-demo-models",
    "safemerge demo-models",
    patterns=(*MODEL_OUTPUT_PATTERNS, "demo_models.json"),
)
SAFETY_LORA = OutputKind(
    "safety LoRA",
    "safety_lora_report.json",
    "safemerge-safety-lora",
    "safemerge safety-lora",
    patterns=(*MODEL_OUTPUT_PATTERNS, "safety_lora_report.json"),
)
TUNE = OutputKind(
    "tune result",
    "tune.json",
    "safemerge-tune",
    "safemerge tune",
    patterns=("tune.*", "chosen.yml", *MODEL_OUTPUT_PATTERNS),
)
KINDS: tuple[OutputKind, ...] = (MODEL, ADAPTER, SCAN, DEMO_MODELS, TUNE, SAFETY_LORA)


def read_manifest(path: str, fmt: str | None = None) -> dict[str, Any] | None:
    """The JSON object in ``path`` when it is a SafeMERGE manifest (of format ``fmt``, or any
    ``safemerge-*`` format), else None: the one test of "is this file ours?"."""
    try:
        with open(path, encoding="utf-8") as fp:
            document = json.load(fp)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    found = document.get("format")
    if not isinstance(found, str) or not found.startswith("safemerge-"):
        return None
    return document if fmt is None or found == fmt else None


class DestinationLock:
    """An exclusive lock on ``<parent>/.<name>.safemerge.lock`` (``flock``; the kernel drops it
    when the holder dies). The holder removes the file before unlocking."""

    def __init__(self, destination: str):
        parent, name = os.path.split(destination)
        self.path = os.path.join(parent, f".{name}.safemerge.lock")
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise SafeMergeError(
                    f"{what}: cannot write in {os.path.dirname(self.path)} "
                    f"({error.strerror or error})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise SafeMergeError(
                    f"{what} is being written by another SafeMERGE run (pid {holder}); wait for "
                    "it to finish or choose another folder"
                ) from None
            # The previous holder may have removed the file between our open and our lock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _relative_files(folder: str) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def require_path(destination: str, what: str = "output folder") -> None:
    """An empty or blank output path (an unset shell variable) would write into the current
    folder: refused, before anything else is checked."""
    if not destination or not destination.strip():
        raise SafeMergeError(f"the {what} is an empty path (an unset variable?); give a folder")


class OutputFolder:
    """Where a run's files go: validated first, staged during the run, published at the end.

    ``kind`` says what the run writes (its manifest, the names it may write); ``inputs`` maps a
    label (``aligned model M``) to a local folder the run reads.
    """

    def __init__(
        self,
        destination: str,
        kind: OutputKind,
        *,
        inputs: Mapping[str, str] | None = None,
        what: str = "output folder",
    ):
        require_path(destination, what)
        self.kind = kind
        self.destination = os.path.abspath(os.path.expanduser(destination))
        self.manifest = kind.manifest
        self.patterns = kind.patterns
        self.inputs = dict(inputs or {})
        self.label = f"{what} {destination}"
        self._lock = DestinationLock(self.destination)
        self._staging_root: str | None = None
        self._created_parents: list[str] = []
        self.previous_files: list[str] = []

    # -------------------------------------------------------------- before any heavy work
    def check(self, inputs: Mapping[str, str] | None = None) -> None:
        """Refuse what could lose data, before any tensor is read (the lock is not held yet).

        ``inputs`` (label -> local folder the run reads) are kept for the check under the lock.
        """
        if inputs is not None:
            self.inputs = dict(inputs)
        path = self.destination
        if os.path.islink(path) and not os.path.exists(path):
            raise SafeMergeError(f"{self.label} is a dangling symbolic link; remove it first")
        if os.path.exists(path) and not os.path.isdir(path):
            raise SafeMergeError(f"{self.label} is a file, not a folder")
        real = os.path.realpath(path)
        for label, folder in self.inputs.items():
            folder = os.path.realpath(folder)
            if real == folder:
                relation = "is"
            elif _inside(real, folder):
                relation = "is inside"
            elif _inside(folder, real):
                relation = "contains"
            else:
                continue
            raise SafeMergeError(
                f"{self.label} {relation} the folder of {label}; write the output elsewhere "
                "(SafeMERGE never writes into its inputs)"
            )
        if os.path.isdir(path):
            self._refuse_other_kinds()
        self.previous_files = self._previous_output() if os.path.isdir(path) else []
        if os.path.isdir(path):
            foreign = self._foreign_files()
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise SafeMergeError(
                    f"{self.label} holds files that no SafeMERGE run wrote ({shown}); choose a "
                    "new or empty folder, or move those files away"
                )

    def _refuse_other_kinds(self) -> None:
        """One output kind per folder: an earlier output of another kind is never replaced."""
        for kind in KINDS:
            if kind == self.kind:
                continue
            document = read_manifest(os.path.join(self.destination, kind.manifest), kind.format)
            if document is None or not kind.owns(document):
                continue
            raise SafeMergeError(
                f"{self.label} holds a {kind.name} written by {kind.command} ({kind.manifest}); "
                f"write the {self.kind.name} to another folder, or remove that folder yourself "
                "first"
            )

    def _previous_output(self) -> list[str]:
        """The files an earlier run of this kind published here, from its manifest."""
        document = read_manifest(os.path.join(self.destination, self.manifest), self.kind.format)
        if document is None or not self.kind.owns(document):
            return []
        files = document.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return []
        real = os.path.realpath(self.destination)
        listed = []
        for name in files:
            full = os.path.realpath(os.path.join(self.destination, name))
            if _inside(full, real) and full != real:  # never a path outside the folder
                listed.append(os.path.relpath(full, real))
        for name, fmt in self.kind.dependents:  # e.g. an eval result of the replaced model
            if read_manifest(os.path.join(self.destination, name), fmt) is not None:
                listed.append(name)
        return listed

    def _foreign_files(self) -> list[str]:
        ours = set(self.previous_files)
        return [
            name
            for name in _relative_files(self.destination)
            if name not in ours
            and any(fnmatch.fnmatch(os.path.basename(name), p) for p in self.patterns)
        ]

    # -------------------------------------------------------------- the run
    @property
    def staging(self) -> str:
        """Where the run writes: ``<staging root>/<destination name>``."""
        if self._staging_root is None:
            raise RuntimeError("OutputFolder.staging used outside its with-block")
        return os.path.join(self._staging_root, os.path.basename(self.destination))

    def __enter__(self) -> OutputFolder:
        parent = os.path.dirname(self.destination)
        self._make_parents(parent)
        try:
            self._lock.acquire(self.label)
        except BaseException:
            self._remove_created_parents()
            raise
        try:
            self.check()  # again, under the lock: another run may have published meanwhile
            self._remove_stale_staging(parent)
            name = os.path.basename(self.destination)
            self._staging_root = tempfile.mkdtemp(prefix=f".{name}.safemerge-staging-", dir=parent)
            with open(os.path.join(self._staging_root, STAGING_MARK), "w") as fp:
                fp.write(str(os.getpid()))
            os.mkdir(self.staging)
        except BaseException:
            self._discard()
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._discard()

    def _make_parents(self, parent: str) -> None:
        missing = []
        while parent and not os.path.isdir(parent):
            if os.path.lexists(parent):
                raise SafeMergeError(f"{self.label}: {parent} is a file, not a folder")
            missing.append(parent)
            parent = os.path.dirname(parent)
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                continue
            except OSError as error:
                raise SafeMergeError(
                    f"{self.label}: cannot create {folder} ({error.strerror})"
                ) from None
            self._created_parents.append(folder)

    def _remove_created_parents(self) -> None:
        for folder in reversed(self._created_parents):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when still empty
        self._created_parents = []

    def _remove_stale_staging(self, parent: str) -> None:
        prefix = f".{os.path.basename(self.destination)}.safemerge-staging-"
        for entry in os.scandir(parent):
            ours = entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False)
            if ours and os.path.isfile(os.path.join(entry.path, STAGING_MARK)):
                shutil.rmtree(entry.path, ignore_errors=True)

    def _discard(self) -> None:
        """Remove the staging folder (ours alone), any parent we created, and the lock."""
        if self._staging_root is not None:
            shutil.rmtree(self._staging_root, ignore_errors=True)
            self._staging_root = None
        if not os.path.exists(self.destination):
            self._remove_created_parents()
        self._lock.release()

    def staged_files(self) -> list[str]:
        return _relative_files(self.staging)

    def publish(self, manifest: dict[str, Any]) -> list[str]:
        """Write ``manifest`` (its ``files``: every staged file and itself) into the staging
        folder, then move the staged files into the destination; returns the published paths.

        A new destination is one atomic rename. An existing one first loses the files of the
        earlier output listed in its manifest (the manifest first, so an interruption leaves no
        manifest that lies), then receives the new files, the manifest last.
        """
        manifest["files"] = sorted({*self.staged_files(), self.manifest})
        write_json_atomic(os.path.join(self.staging, self.manifest), manifest)
        _modes_from_umask(self.staging)
        staged = self.staged_files()
        if not os.path.exists(self.destination):
            os.rename(self.staging, self.destination)
            return staged
        clash = [
            name
            for name in staged
            if os.path.lexists(os.path.join(self.destination, name))
            and name not in self.previous_files
        ]
        if clash:
            kept = self._keep_unpublished()
            raise SafeMergeError(
                f"{self.label}: {clash[0]} appeared there during the run and is not ours, so "
                f"nothing was replaced; the finished output is in {kept}"
            )
        old = sorted(self.previous_files, key=lambda n: n != self.manifest)
        for name in old:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.destination, name))
        for name in sorted(staged, key=lambda n: n == self.manifest):
            target = os.path.join(self.destination, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(self.staging, name), target)
        return staged

    def _keep_unpublished(self) -> str:
        base = f"{self.destination}.unpublished"
        target, n = base, 1
        while os.path.lexists(target):
            n += 1
            target = f"{base}-{n}"
        os.rename(self.staging, target)
        return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _modes_from_umask(folder: str) -> None:
    """Every file and folder of ``folder`` with the mode the umask gives a new one (some writers,
    safetensors among them, create weights 0600: unreadable to a server running as another
    user)."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def describe_os_error(error: OSError, where: str) -> str:
    """One line for an OS error while writing ``where`` (a full disk named as such)."""
    if error.errno == errno.ENOSPC:
        return f"disk full while writing {where} (No space left on device)"
    if error.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {where}"
    detail = error.strerror or str(error)
    target = f" {error.filename}" if error.filename else ""
    return f"cannot write {where}:{target} ({detail})"


def write_json_atomic(path: str, document: Any) -> None:
    """Write ``document`` to ``path`` through a temporary file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    umask = _umask()
    try:
        os.chmod(temporary, 0o666 & ~umask)  # as open() would create it, not mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as fp:
            json.dump(document, fp, indent=2, allow_nan=False)
            fp.write("\n")
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
