"""Tar shards where they live: ``http(s)://``, ``s3://`` and ``gs://`` through fsspec, and ``pipe:CMD``.

A remote shard is read front to back, never by seeking around in it: ``read_shard`` opens it
(fsspec's file, read ahead in blocks of ``BLOCK`` bytes by range requests; or the standard
output of webdataset's ``pipe:CMD``), walks its tar members in order and yields each
sample's wanted members as bytes (``(key, {suffix: bytes or None})``, the members not
wanted as None: their names stay, their bytes are dropped).

**Faults.** Any failure while a shard is read (a connection refused or reset, a timeout,
an HTTP 5xx or 429, a transfer cut short, a tar that ends before the samples it was
counted with) is retried ``ReadPolicy.retries`` times, waiting ``backoff``, twice that, ...
(at most 30 s) between tries; each try reopens the shard at the tar header of the first
sample not yet delivered (a range request; ``pipe:`` reruns the command and reads past the
bytes already used), so nothing is delivered twice and a retry after progress starts a
new count. Past that, ``ShardFailed`` says how many samples were delivered; the readers
count the rest as skipped (``FaultBudget``). Errors that no retry heals stop at once with
``RemoteReadError``: a missing object or bucket, denied access (credentials), another
4xx, a server that ignores range requests, or a first member that is not a tar header.

**Read-ahead.** ``Prefetcher`` reads a list of shards in a background thread, ahead of the
consumer by at most ``READ_AHEAD`` bytes of samples: while a loader worker decodes the end
of one shard (its shuffle buffer draining), the next one is opened and streamed.

**Credentials** come from where fsspec's back-ends look (s3fs: ``AWS_*`` variables,
``~/.aws``; gcsfs: ``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's login; ``user:password@``
in an HTTP URL) and are never written by us: every message, warning and saved spec goes
through ``redact``, which hides a URL's ``user:password@`` and the values of query
parameters that hold signatures or tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import subprocess
import tarfile
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = [
    "BLOCK",
    "READ_AHEAD",
    "REMOTE_SCHEMES",
    "CommandFailed",
    "FaultBudget",
    "Prefetcher",
    "ReadPolicy",
    "RemoteRetryWarning",
    "RemoteReadError",
    "ShardFailed",
    "ShardReadWarning",
    "for_scheme",
    "is_remote",
    "member_key",
    "open_remote",
    "read_shard",
    "redact",
]

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "gcs")
BLOCK = 8 * 2**20
"""Bytes fsspec fetches per range request (and holds, read ahead) while a shard streams."""
READ_AHEAD = 32 * 2**20
"""Bytes of samples a ``Prefetcher`` reads ahead of its consumer (the next shard's first ones)."""
MAX_WAIT = 30.0
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# ``user:password@`` (up to the last @ before the path: a password may hold @, ? or #), or a
# ``token@`` without a colon (up to an @ before any ?, #: a query's e-mail address is no token)
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(?:[^/\s'\"?#:@]*:[^/\s'\"]*|[^/\s'\"?#:@]+)@")
_SECRET_QUERY = re.compile(
    r"(?i)([?&][\w.-]*(?:signature|credential|token|secret|password|passwd|sig|key|auth)[\w.-]*=)[^&\s'\"#]*"
)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, skipped as it skips them
_EXTRAS = {
    "s3": 'reading s3:// shards needs s3fs: pip install "byol-pytorch[s3]"',
    "gs": 'reading gs:// shards needs gcsfs: pip install "byol-pytorch[gcs]"',
    "gcs": 'reading gs:// shards needs gcsfs: pip install "byol-pytorch[gcs]"',
    "http": 'reading http(s):// shards needs fsspec and aiohttp: pip install "byol-pytorch[http]"',
    "https": 'reading http(s):// shards needs fsspec and aiohttp: pip install "byol-pytorch[http]"',
}
_CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or gcloud auth application-default login",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS or gcloud auth application-default login",
}

# A sample of a streamed shard: its key and, per member suffix, the bytes (None: not wanted).
Sample = tuple[str, dict[str, Any]]
Wanted = Callable[[str, dict[str, Any]], bool]


class RemoteReadError(RuntimeError):
    """A shard cannot be read and no retry will change that, or too many shards failed (one line)."""


class ShardReadWarning(UserWarning):
    """A shard failed past its retries; its remaining samples are counted as skipped."""


class ShardFailed(Exception):
    """A shard's read failed past its retries after ``delivered`` samples (the reason in the message)."""

    def __init__(self, message: str, delivered: int = 0) -> None:
        super().__init__(message)
        self.delivered = delivered


AGAIN = "train: --resume, from its last checkpoint; embed: --resume"
"""How each command goes on after a storage outage, for the messages the readers cannot tailor."""
TIMEOUT_ENV = "BYOL_PYTORCH_REMOTE_TIMEOUT"
RETRIES_ENV = "BYOL_PYTORCH_REMOTE_RETRIES"


def _env_number(name: str, default: float, kind: type, least: float) -> Any:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if not least <= value < math.inf:
        raise ValueError(f"{name}={text!r}: give a {'whole ' if kind is int else ''}number >= {least:g}")
    return value


def _default_timeout() -> float:
    return _env_number(TIMEOUT_ENV, 30.0, float, 0.1)


def _default_retries() -> int:
    return _env_number(RETRIES_ENV, 8, int, 0)


@dataclass(frozen=True)
class ReadPolicy:
    """How remote shards are read: retries of a failed read, the wait between them, the stall timeout.

    Args:
        retries: tries after the first failure of a shard's read (a try that delivers a sample resets the count);
            default 8, or ``BYOL_PYTORCH_REMOTE_RETRIES``.
        backoff: seconds before the first retry; each next waits twice as long, at most 30 s.
        timeout: seconds a connection or a read may stall before it counts as failed (opening a shard may take
            two requests); default 30, or ``BYOL_PYTORCH_REMOTE_TIMEOUT``.

    Examples:
        >>> [ReadPolicy(retries=8).wait(k) for k in range(1, 9)]
        [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    """

    retries: int = field(default_factory=_default_retries)
    backoff: float = 0.5
    timeout: float = field(default_factory=_default_timeout)

    def wait(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1, 2, ...)."""
        return min(MAX_WAIT, self.backoff * 2 ** (attempt - 1))


def is_remote(location: object) -> bool:
    """Whether a shard location is read remotely: an ``http(s)``/``s3``/``gs`` URL or ``pipe:CMD``.

    Examples:
        >>> is_remote("s3://bucket/train-0000.tar"), is_remote("pipe:cat a.tar"), is_remote("shards/a.tar")
        (True, True, False)
    """
    if not isinstance(location, str):
        return False
    scheme = _SCHEME.match(location)
    return location.startswith("pipe:") or (scheme is not None and scheme.group(1).lower() in REMOTE_SCHEMES)


def redact(text: object) -> str:
    """``text`` with credentials hidden: URLs' ``user:password@`` and secret-looking query values as ``***``.

    Examples:
        >>> redact("https://me:pw@host/a-{0..9}.tar?X-Amz-Signature=abc&part=1")
        'https://***@host/a-{0..9}.tar?X-Amz-Signature=***&part=1'
        >>> redact("http://me:p@ss@host/a.tar"), redact("s3://bucket/key@v2.tar")
        ('http://***@host/a.tar', 's3://bucket/key@v2.tar')
    """
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", str(text)))


def _scheme(location: str) -> str:
    match = _SCHEME.match(location)
    return match.group(1).lower() if match else ""


def _storage_options(scheme: str, policy: ReadPolicy) -> dict[str, Any]:
    """fsspec options: our timeouts, and the back-end's own retries off where ours replace them."""
    if scheme in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=policy.timeout, sock_read=policy.timeout)
        return {"client_kwargs": {"timeout": timeout}}
    if scheme == "s3":
        config = {"connect_timeout": policy.timeout, "read_timeout": policy.timeout}
        return {"config_kwargs": {**config, "retries": {"total_max_attempts": 1}}}
    if scheme == "gs":  # gcsfs retries 6 times inside each of our tries (not configurable); its timeout is ours
        import aiohttp

        stall = aiohttp.ClientTimeout(total=None, sock_connect=policy.timeout, sock_read=policy.timeout)
        return {"requests_timeout": stall}  # a float would be aiohttp's total: a slow link's 8 MB block would fail
    return {}


def _filesystem(location: str, policy: ReadPolicy) -> tuple[Any, str]:
    """``(fsspec file system, path)`` of a URL; a missing back-end is an ImportError naming the extra."""
    scheme = _scheme(location)
    try:
        import fsspec

        return fsspec.core.url_to_fs(location, **_storage_options(scheme, policy))
    except ImportError as error:
        raise ImportError(_EXTRAS.get(scheme, f"reading {scheme}:// needs fsspec ({error})")) from None


class CommandFailed(ConnectionError):
    """A ``pipe:`` command exited with a non-zero status (``returncode``); retried unless the shell could not run it."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"the command exited with status {returncode}")
        self.returncode = returncode


# The shell's own statuses: the command was not found (127) or is not executable (126); no retry runs it
_SHELL_COULD_NOT_RUN = {126: "is not executable", 127: "was not found"}


class _PipeFile:
    """The standard output of ``pipe:CMD`` (webdataset's form), from byte ``offset`` on (read past)."""

    def __init__(self, command: str, offset: int) -> None:
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
        stdout = self.process.stdout
        assert stdout is not None  # PIPE was asked for
        self.stdout: IO[bytes] = stdout
        while offset > 0:
            skipped = self.read(min(offset, BLOCK))
            if not skipped:
                break
            offset -= len(skipped)

    def read(self, size: int = -1) -> bytes:
        data = self.stdout.read(size)
        if (size < 0 or len(data) < size) and self.process.wait() != 0:
            raise CommandFailed(self.process.returncode)
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.stdout.close()
        self.process.wait()


def open_remote(location: str, offset: int = 0, policy: ReadPolicy | None = None) -> Any:
    """A remote shard opened for reading from byte ``offset`` on (a file-like object with ``read``/``close``).

    Raises:
        ImportError: the URL's fsspec back-end is missing (the message names the extra to install).
        OSError: the object cannot be opened (``FileNotFoundError``, ``PermissionError``, network errors).
    """
    if location.startswith("pipe:"):
        return _PipeFile(location[len("pipe:") :], offset)
    fs, path = _filesystem(location, policy or ReadPolicy())
    file = fs.open(path, "rb", block_size=BLOCK, cache_type="readahead")
    file.seek(offset)
    return file


def member_key(name: str) -> tuple[str, str] | None:
    """``(key, suffix)`` of a tar member's name by webdataset's rule (key: up to the basename's first dot).

    None for webdataset's ``__*__`` metadata members and names without a suffix.

    Examples:
        >>> member_key("a/000123.seg.png"), member_key("__meta__/info.json"), member_key("README")
        (('a/000123', 'seg.png'), None, None)
    """
    if _META.match(name):
        return None
    head, slash, base = name.rpartition("/")
    key, dot, suffix = base.partition(".")
    if not dot or not key:
        return None
    return head + slash + key, suffix.lower()


class CutShort(EOFError):
    """A tar stream that ends without its end-of-archive block: the object was cut short."""


class _Counted:
    """A stream's ``read``, counting the bytes it delivered and keeping the last ones (``block``)."""

    KEPT = 1 << 16  # bytes kept at least: more than tarfile's stream buffer, which reads 10240 at a time

    def __init__(self, file: Any) -> None:
        self.file, self.delivered = file, 0
        self.chunks: collections.deque[bytes] = collections.deque()  # the last reads (no copy of the stream)
        self.kept = 0

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.delivered += len(data)
        self.chunks.append(data)
        self.kept += len(data)
        while self.kept - len(self.chunks[0]) >= self.KEPT:
            self.kept -= len(self.chunks.popleft())
        return data

    def block(self, offset: int) -> bytes:
        """The tar block at ``offset`` of the stream, from the bytes kept (b"" when they no longer hold it)."""
        start = offset - (self.delivered - self.kept)
        return b"".join(self.chunks)[start : start + tarfile.BLOCKSIZE] if start >= 0 else b""


def _samples_from(file: Any, base: int, wanted: Wanted) -> Iterator[tuple[Sample, int]]:
    """``(sample, offset of the next sample's first header)`` of a tar stream that starts at byte ``base``.

    Raises:
        CutShort: the stream ends without the tar's end-of-archive block, inside a header or at a member's end
            (Python's tarfile reads either as the archive's end): the object was cut short.
    """
    key: str | None = None
    members: dict[str, Any] = {}
    file = _Counted(file)
    with tarfile.open(fileobj=file, mode="r|") as tar:
        for member in tar:
            tar.members = []  # type: ignore[attr-defined]  # stream mode keeps every header otherwise
            parsed = member_key(member.name) if member.isreg() else None
            if parsed is None:
                continue
            if parsed[0] != key:
                if key is not None:
                    yield (key, members), base + member.offset
                key, members = parsed[0], {}
            reader = tar.extractfile(member) if wanted(parsed[1], members) else None
            members[parsed[1]] = reader.read() if reader is not None else None
        if file.delivered < tar.offset + tarfile.BLOCKSIZE:  # the block after the last member was never read whole
            raise CutShort(f"the object ends at byte {base + file.delivered}, without the tar's end-of-archive block")
        if any(file.block(tar.offset)):  # tarfile takes a block of garbage for the archive's end too
            raise CutShort(
                f"the block at byte {base + tar.offset} is neither a tar header nor the archive's end: the object is "
                "damaged"
            )
    if key is not None:
        yield (key, members), -1


def _network(error: BaseException | None) -> bool:
    """A connection refused, reset or timed out (not an answer of the server)."""
    if error is None or isinstance(error, FileNotFoundError | PermissionError):
        return False
    names = {c.__name__ for c in type(error).__mro__}
    return isinstance(error, OSError) or bool(names & {"ClientConnectionError", "ClientPayloadError"})


_NO_CREDENTIALS = {
    "NoCredentialsError",  # botocore
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "DefaultCredentialsError",  # google-auth
}


def _credentials_missing(error: BaseException | None) -> bool:
    """botocore's or google-auth's "no credentials found", in the error or its causes (no retry finds them)."""
    seen = 0
    while error is not None and seen < 5:
        if {c.__name__ for c in type(error).__mro__} & _NO_CREDENTIALS:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _permanent(error: BaseException, location: str, at_start: bool) -> str | None:
    """Why a failed read will fail again (a one-line reason), or None when a retry may heal it."""
    scheme = _scheme(location)
    if isinstance(error, CommandFailed) and error.returncode in _SHELL_COULD_NOT_RUN:
        return (
            f"the command {_SHELL_COULD_NOT_RUN[error.returncode]} (exit status {error.returncode}; the shell's "
            "message is above); check the command after pipe: and that it is installed"
        )
    if _credentials_missing(error):
        where = _CREDENTIALS.get(scheme, "the storage's credentials")
        return f"no credentials found ({_reason(error)}); give them ({where})"
    status = getattr(error, "status", None)
    if isinstance(error, FileNotFoundError):  # fsspec's HTTP: the server's answer (or none) is the cause
        status = getattr(error.__cause__, "status", None)
        if _network(error.__cause__) or (isinstance(status, int) and (status >= 500 or status in (408, 429))):
            return None  # no answer (refused, reset, timed out) or a server error: the network, not the URL
        if status not in (401, 403):
            return f"no such object or bucket ({error}); check the URL and the pattern"
    if isinstance(error, PermissionError) or status in (401, 403):
        where = _CREDENTIALS.get(scheme, "user:password@ in the URL or the server's settings")
        return f"access denied ({error}); check the credentials ({where})"
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return f"HTTP status {status} ({error})"
    if isinstance(error, ValueError) and "range requests" in str(error):
        return (
            f"the server does not answer HTTP range requests; serve the shards with one that does (nginx, any "
            f"object store), or read them with --data 'pipe:curl -s {location}'"
        )
    if isinstance(error, tarfile.ReadError) and at_start and "unexpected end" not in str(error):
        return f"not an uncompressed tar file ({error}); shards are plain .tar"
    return None


def _reason(error: BaseException) -> str:
    status = getattr(error, "status", None) or getattr(error.__cause__, "status", None)
    if isinstance(status, int):
        return f"HTTP status {status}"
    cause = error.__cause__
    if isinstance(error, FileNotFoundError) and cause is not None and _network(cause):
        error = cause  # fsspec's HTTP wraps "connection refused" as a missing file: name what happened
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


SAME_CUT_READS = 3  # reads that end in the same place before a shard is taken for truncated


def _same_cut(failures: list[tuple[int, str]], error: BaseException, location: str) -> bool:
    """Whether the last reads all ended the same way at the same offset: the object itself is cut short.

    A connection that drops does so at a different byte each time (and fsspec resumes past it);
    a tar that is cut short ends with the same error every time it is read from the same sample.
    Not for ``pipe:`` commands: ``curl -s`` writes a server's error page as if it were the data.
    """
    if location.startswith("pipe:") and not isinstance(error, EOFError):
        return False
    if not isinstance(error, tarfile.ReadError | EOFError) or len(failures) < SAME_CUT_READS:
        return False
    return len(set(failures[-SAME_CUT_READS:])) == 1


def read_shard(
    location: str,
    expected: int | None,
    wanted: Wanted,
    policy: ReadPolicy | None = None,
    stop: threading.Event | None = None,
) -> Iterator[Sample]:
    """The samples of one remote shard in tar order (at most ``expected``), retried where a read fails.

    Args:
        location: an ``http(s)``/``s3``/``gs`` URL or ``pipe:CMD``.
        expected: the shard's sample count (from an index or a count); fewer is a failure to
            retry (a truncated object), more are not read. None: read to the end.
        wanted: ``wanted(suffix, members so far)``: whether a member's bytes are kept.
        policy: retries, backoff and timeout.
        stop: set to give up between samples and during waits (the generator just ends).

    Raises:
        ShardFailed: the read failed past ``policy.retries`` tries (``delivered`` samples were read).
        RemoteReadError: an error no retry heals (module doc), with the URL redacted.
        ImportError: the URL's fsspec back-end is missing.
    """
    policy = for_scheme(policy or ReadPolicy(), location)
    stop = stop or threading.Event()
    delivered = offset = attempt = 0
    failures: list[tuple[int, str]] = []  # (offset, error) of the tries since the last sample
    while not stop.is_set():
        try:
            start, again = (0, delivered) if offset < 0 else (offset, 0)  # a stream read to its end: from the top
            file = open_remote(location, start, policy)
            try:
                for sample, after in _samples_from(file, start, wanted):
                    if again:  # delivered before: skipped, never handed out twice
                        again -= 1
                        continue
                    delivered, attempt, offset = delivered + 1, 0, after
                    yield sample
                    if delivered == expected or stop.is_set():
                        return
            finally:
                file.close()
            if expected is None or delivered >= expected:
                return
            raise EOFError(f"the shard ends after {delivered} of the {expected} samples it was counted with")
        except ImportError:
            raise
        except Exception as error:
            reason = _permanent(error, location, delivered == 0 and offset == 0)
            failures = [f for f in failures if f[0] == offset] + [(offset, f"{type(error).__name__}: {error}")]
            if reason is None and _same_cut(failures, error, location):
                reason = (
                    f"{error} on {len(failures)} reads in a row: the count it was read with (--shard-index, the "
                    "count cache) is stale, or the object was cut short; write the index again (byol-pytorch shards "
                    "index), or upload the shard again"
                    if isinstance(error, EOFError) and not isinstance(error, CutShort)
                    else f"the object is cut short or damaged at the same place on every read ({_reason(error)}, "
                    f"{len(failures)} reads from byte {offset}): it is truncated or corrupt; upload the shard again"
                )
            if reason is not None:
                raise RemoteReadError(redact(f"{location}: {reason}")) from None
            attempt += 1
            if attempt > policy.retries:
                message = f"{location}: {_reason(error)} (after {policy.retries} retries)"
                raise ShardFailed(redact(message), delivered) from None
            _warn_retrying(location, error, policy)
            stop.wait(policy.wait(attempt))


def for_scheme(policy: ReadPolicy, location: str) -> ReadPolicy:
    """``policy`` for ``location``: gs:// tries at most 2 more times, as gcsfs retries each of our tries 6 times
    (with waits up to 32 s: about half a minute a try) and cannot be told not to."""
    if _scheme(location) == "gs" and policy.retries > 2:
        return dataclasses.replace(policy, retries=2)
    return policy


class RemoteRetryWarning(UserWarning):
    """A remote read failed and is retried (given once per process)."""


_retry_warned = False


def _warn_retrying(location: str, error: BaseException, policy: ReadPolicy) -> None:
    """The first failed read of this process gets a warning: retries of a stalled server can take minutes."""
    global _retry_warned
    if _retry_warned:
        return
    _retry_warned = True
    most = sum(policy.wait(k) for k in range(1, policy.retries + 1)) + (policy.retries + 1) * 2 * policy.timeout
    warnings.warn(
        redact(
            f"{location}: {_reason(error)}; retrying up to {policy.retries} times (a server that does not answer "
            f"takes up to {f'{most:.0f} s' if most < 120 else f'{most / 60:.0f} min'} a shard to give up: "
            f"{RETRIES_ENV} and {TIMEOUT_ENV}, now "
            f"{policy.timeout:g} s, set how long)"
        ),
        RemoteRetryWarning,
        stacklevel=2,
    )


class _ByteQueue:
    """A FIFO of items with sizes: ``put`` waits while the held bytes would pass ``limit`` (one item always fits)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held, self.closed = limit, 0, False
        self.items: deque[tuple[Any, int]] = deque()
        self.lock = threading.Condition()

    def put(self, item: Any, size: int) -> bool:
        with self.lock:
            while self.held and self.held + size > self.limit and not self.closed:
                self.lock.wait(0.1)
            if self.closed:
                return False
            self.items.append((item, size))
            self.held += size
            self.lock.notify_all()
            return True

    def get(self) -> Any:
        with self.lock:
            while not self.items:
                self.lock.wait(0.1)
            item, size = self.items.popleft()
            self.held -= size
            self.lock.notify_all()
            return item

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.items.clear()
            self.held = 0
            self.lock.notify_all()


_END = object()


def _size(sample: Sample) -> int:
    return sum(len(value) for value in sample[1].values() if value is not None)


class Prefetcher:
    """Remote shards read in order by a background thread, at most ``limit`` bytes ahead of the consumer.

    Args:
        jobs: ``(location, expected samples)`` per shard, in reading order.
        wanted: which members' bytes to keep (see ``read_shard``).
        policy: retries, backoff and timeout of each shard's read.
        limit: bytes of samples held between the thread and the consumer (None: ``READ_AHEAD``).

    Use ``shard(i)`` for the samples of job ``i`` (in order, each once) and ``close()`` at the end.
    """

    def __init__(
        self, jobs: list[tuple[str, int]], wanted: Wanted, policy: ReadPolicy, limit: int | None = None
    ) -> None:
        self.jobs, self.wanted, self.policy = jobs, wanted, policy
        self.queue = _ByteQueue(READ_AHEAD if limit is None else limit)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="byol-shard-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for number, (location, expected) in enumerate(self.jobs):
            try:
                for sample in read_shard(location, expected, self.wanted, self.policy, self.stop):
                    if not self.queue.put((number, sample), _size(sample)):
                        return
                end: Any = _END
            except (ShardFailed, RemoteReadError, ImportError, Exception) as error:
                end = error
            if self.stop.is_set() or not self.queue.put((number, end), 0):
                return
            if not isinstance(end, ShardFailed) and end is not _END:
                return  # a permanent error: the consumer stops at it

    def shard(self, number: int) -> Iterator[Sample]:
        """The samples of job ``number``; raises its ``ShardFailed`` or permanent error after those delivered."""
        while True:
            got, item = self.queue.get()
            if got != number:
                raise RuntimeError(f"the prefetcher is at shard {got}, the reader asked for {number}")
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread (it ends at its next sample or wait) and drop what it read ahead."""
        self.stop.set()
        self.queue.close()
        self.thread.join(timeout=1.0)


class FaultBudget:
    """Failed shards of one reader in one epoch: a warning each, and a stop when too many fail.

    The reader stops (``RemoteReadError``) when ``in_a_row`` shards in a row failed, or
    when more than ``fraction`` of the shards it opened failed, ``in_a_row`` of them at least.
    """

    def __init__(self, in_a_row: int = 3, fraction: float = 0.1) -> None:
        self.in_a_row, self.fraction = in_a_row, fraction
        self.opened = self.failed = self.streak = 0
        self.last: ShardFailed | None = None  # the latest failure

    def ok(self) -> None:
        """A shard was read to its end."""
        self.opened, self.streak = self.opened + 1, 0

    def failure(self, failure: ShardFailed, remaining: int | None) -> None:
        """A shard failed with ``remaining`` samples unread (None: unknown): warn, or raise when the budget is spent."""
        self.opened, self.failed, self.streak = self.opened + 1, self.failed + 1, self.streak + 1
        self.last = failure
        if self.streak >= self.in_a_row or (self.failed >= self.in_a_row and self.failed > self.fraction * self.opened):
            raise RemoteReadError(
                f"{self.failed} of the {self.opened} shards this loader worker opened could not be read "
                f"({self.streak} in a row), the last {failure}; check the network and the storage, then run it "
                f"again ({AGAIN})"
            )
        rest = "its remaining samples are" if remaining is None else f"its {remaining} remaining samples are"
        counted = " (counted in skipped_files)" if remaining is not None else ""
        warnings.warn(
            f"{failure}; {rest} skipped{counted}",
            ShardReadWarning,
            stacklevel=2,
        )
