"""RegistryClient and AsyncRegistryClient: models, versions, aliases, uploads and downloads.

The two classes have the same methods with the same arguments; the async one is awaited (and its iterators
are ``async for``). Both build requests and read answers through ``_convert``, so only the I/O differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import grpc
import grpc.aio

from modelforge import _convert
from modelforge._channel import CLIENT_TIMEOUT, REGISTRY, AsyncChannelClient, ChannelClient, Timeout, call_timeout
from modelforge._convert import DEFAULT_CHUNK_BYTES, Progress
from modelforge._directories import MadeDirectories
from modelforge._domain import Model, ModelEvent, ModelVersion, VersionState
from modelforge._errors import (
    CancelledError,
    DeadlineExceededError,
    ModelForgeError,
    UnavailableError,
    naming,
    translated,
    with_details,
)
from modelforge._refs import ModelRef, validate_alias, validate_model_name, validate_version
from modelforge.registry.v1 import registry_pb2 as pb
from modelforge.registry.v1 import registry_pb2_grpc

__all__ = ["AsyncRegistryClient", "RegistryClient"]

Source = str | os.PathLike[str] | bytes | bytearray | memoryview
"""What :meth:`RegistryClient.push` uploads: a file path, or the file's bytes."""


def _check_chunk(chunk_bytes: int) -> int:
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be at least 1, not {chunk_bytes}")
    return chunk_bytes


def _check_source(source: object) -> None:
    if not isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
        raise TypeError(
            f"push takes the path of an .onnx file or its bytes, not {type(source).__name__}; for an "
            "onnx.ModelProto (what skl2onnx and torch.onnx give), pass model.SerializeToString()"
        )


def _target_file(path: str | os.PathLike[str], ref: str | ModelRef) -> Path:
    """Where a download lands: ``path`` itself, or ``<dir>/<name>.onnx`` when ``path`` is a directory, or ends in a
    separator (a directory to make: Path drops the separator)."""
    target = Path(path)
    if target.is_dir() or os.fspath(path).endswith(("/", os.sep)):
        return target / f"{ModelRef.parse(ref).name}.onnx"
    return target


class _Landing:
    """Where a download is written: a temporary file in the target's directory, so that the final rename is atomic.

    Nothing is made before :meth:`file` is first called, once the download's header has arrived: a download the
    registry refuses leaves no file and no directory. The file is made with the mode open() gives (0666 less the
    umask), not mkstemp's private 0600, since it becomes the downloaded file. :meth:`discard` removes it, and the
    directories made for it. OS errors name the target, not the temporary file.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self._part: tuple[IO[bytes], Path] | None = None
        self._directories = MadeDirectories()

    def file(self) -> IO[bytes]:
        """The open temporary file, made (with any missing directories) on the first call."""
        return self._opened()[0]

    def commit(self) -> None:
        """Closes the file and renames it onto the target."""
        file, path = self._opened()
        file.close()
        with naming(self.target):
            os.replace(path, self.target)

    def discard(self) -> None:
        """Closes and removes the file, and then the directories made for it, unless something else is in them."""
        if self._part is not None:
            file, path = self._part
            with contextlib.suppress(OSError):  # a failed flush: the file goes anyway
                file.close()
            path.unlink(missing_ok=True)
        self._directories.remove()

    def _opened(self) -> tuple[IO[bytes], Path]:
        if self._part is None:
            with naming(self.target):
                self._directories.make(self.target)
                self._part = self._open_part()
        return self._part

    def _open_part(self) -> tuple[IO[bytes], Path]:
        while True:
            part = self.target.parent / f".{self.target.name}.{secrets.token_hex(4)}.part"
            try:
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                continue
            return os.fdopen(fd, "wb"), part


class UnservedOutputsWarning(UserWarning):
    """A pushed version has outputs that are not tensors ModelForge serves: predictions leave them out."""


def _warn_of_unserved_outputs(version: ModelVersion) -> None:
    unserved = [repr(spec.name) for spec in version.signature.outputs if spec.dtype == "unspecified"]
    if unserved:
        warnings.warn(
            f"{version.ref}: output{'s' if len(unserved) > 1 else ''} {', '.join(unserved)} "
            f"{'are' if len(unserved) > 1 else 'is'} not a tensor ModelForge serves (a sequence, a map or another "
            "element type), so predictions leave it out; a scikit-learn classifier exported by skl2onnx with "
            "options={'zipmap': False} returns its probabilities as a tensor",
            UnservedOutputsWarning,
            stacklevel=3,
        )


def _one_version(ref: str | ModelRef) -> ModelRef:
    """The ref of the one version a change is for: a version number or an alias. A bare name is refused: it would
    pick the newest READY version without saying so, and a change to it (a delete) is not for a guess."""
    parsed = ModelRef.parse(ref)
    if parsed.version is None and parsed.alias is None:
        raise ValueError(
            f"{parsed.name!r} names a model, not one of its versions: give {parsed.name}:N or {parsed.name}@ALIAS"
        )
    return parsed


def _alias_not_set(error: ModelForgeError, version: ModelVersion, alias: str) -> ModelForgeError:
    """The error of a push whose version was stored but whose alias could not be set: of the same kind, saying so.

    A call that ran out of time may still have been carried out by the registry, so that one says it is unknown.
    """
    if isinstance(error, (DeadlineExceededError, CancelledError)):
        outcome = f"whether alias {alias} was set is unknown"
    else:
        outcome = f"setting alias {alias} failed"
    return with_details(error, f"pushed {version.ref}, but {outcome}: {error.details}")


def _upload_failed(error: ModelForgeError, plan: _convert.UploadPlan) -> ModelForgeError:
    """The error of a failed upload, saying, where the connection broke once every byte had gone out, that the
    registry may have stored the version all the same."""
    if plan.all_sent and isinstance(error, (UnavailableError, DeadlineExceededError, CancelledError)):
        name = plan.header.model
        return with_details(
            error,
            f"{error.details} (the whole file had been sent: the registry may have stored the version before the "
            f"connection ended; `modelforge models ls {name}` shows whether it did, before pushing again)",
        )
    return error


def _upload_plan(
    name: str,
    sha256: str,
    size: int,
    create_model: bool,
    description: str,
    labels: Mapping[str, str] | None,
    version_label: str,
    progress: Progress | None,
) -> _convert.UploadPlan:
    return _convert.UploadPlan.build(
        name=name,
        sha256=sha256,
        size=size,
        create_model=create_model,
        description=description,
        labels=labels,
        version_label=version_label,
        progress=progress,
    )


class RegistryClient(ChannelClient):
    """A blocking client of the ModelForge registry.

    Use it as a context manager, or call :meth:`close`::

        with RegistryClient("localhost:50051") as registry:
            version = registry.push("model.onnx", name="fraud", alias="production")
            for model in registry.list_models():
                print(model.name, model.latest_version)

    Args:
        target: ``host:port`` of the registry; defaults to ``MODELFORGE_REGISTRY_ADDRESS``, else
            ``127.0.0.1:50051``.
        channel: A channel of your own (TLS, interceptors...); the client does not close it. Excludes ``target``.
        timeout: Seconds allowed for each unary call; None for no limit. A method's own ``timeout=`` replaces it
            for that call. Streams (uploads, downloads, watches) have no limit.
        max_message_bytes: Largest message sent or received; None for what the service takes and gives with its
            default settings, 64 MiB.

    Raises:
        modelforge.ModelForgeError: from any method, when the registry refuses a call; the subclass
            says why (NotFoundError, AlreadyExistsError, InvalidArgumentError...).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.Channel | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int | None = None,
    ) -> None:
        super().__init__(REGISTRY, target, channel, max_message_bytes)
        self.timeout = timeout
        """Seconds allowed for each call whose own ``timeout=`` says nothing else; None for no limit."""
        self.registry_stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        """The generated stub over this client's channel, for calls the client does not wrap."""

    # --- models ---

    def create_model(
        self,
        name: str,
        *,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Model:
        """Creates an empty model. Pushing a version creates the model as well, so this is optional.

        Raises:
            AlreadyExistsError: a model has that name.
            ValueError: the name is not a valid model name (no call is made).
        """
        request = pb.CreateModelRequest(
            model=pb.Model(name=validate_model_name(name), description=description, labels=labels or {})
        )
        with translated():
            response = self.registry_stub.CreateModel(request, timeout=call_timeout(timeout, self.timeout))
        return _convert.model(response.model)

    def get_model(self, name: str, *, timeout: Timeout = CLIENT_TIMEOUT) -> Model:
        """Returns one model. Raises NotFoundError if there is none of that name."""
        with translated():
            response = self.registry_stub.GetModel(
                pb.GetModelRequest(name=validate_model_name(name)), timeout=call_timeout(timeout, self.timeout)
            )
        return _convert.model(response.model)

    def list_models(
        self,
        *,
        name_prefix: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 100,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Iterator[Model]:
        """Iterates over the models ordered by name, fetching pages lazily.

        Args:
            name_prefix: Only models whose name starts with this.
            labels: Only models carrying all these labels with these values.
            page_size: Models per request (the server caps it at 500).
        """
        token = ""
        while True:
            request = _convert.list_models_request(
                name_prefix=name_prefix,
                labels=labels,
                page_size=_convert.whole_number(page_size, "page_size"),
                page_token=token,
            )
            with translated():
                page = self.registry_stub.ListModels(request, timeout=call_timeout(timeout, self.timeout))
            yield from (_convert.model(m) for m in page.models)
            if not (token := page.next_page_token):
                return

    def update_model(
        self,
        name: str,
        *,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Model:
        """Changes a model's description and/or labels (those passed; labels are replaced as a whole)."""
        request = _convert.update_model_request(name, description=description, labels=labels)
        with translated():
            response = self.registry_stub.UpdateModel(request, timeout=call_timeout(timeout, self.timeout))
        return _convert.model(response.model)

    def delete_model(self, name: str, *, force: bool = False, timeout: Timeout = CLIENT_TIMEOUT) -> int:
        """Deletes a model and returns how many versions went with it.

        Args:
            name: The model.
            force: Also delete its versions and aliases; without it, a model with versions is refused.

        Raises:
            FailedPreconditionError: the model has versions and ``force`` is not set.
        """
        with translated():
            response = self.registry_stub.DeleteModel(
                pb.DeleteModelRequest(name=validate_model_name(name), force=force),
                timeout=call_timeout(timeout, self.timeout),
            )
        return int(response.deleted_versions)

    # --- versions ---

    def push(
        self,
        source: Source,
        *,
        name: str,
        create_model: bool = True,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        version_label: str = "",
        alias: str | None = None,
        progress: Progress | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> ModelVersion:
        """Uploads an ONNX file as the model's next version.

        The sha256 and size are computed first and sent ahead of the bytes, so the registry can verify what
        it receives.

        Args:
            source: A path to the file, or its bytes.
            name: The model to add a version to.
            create_model: Create the model if it does not exist (otherwise NotFoundError).
            description: Free text for the version.
            labels: Labels for the version.
            version_label: A free-form label such as a semver.
            alias: Point this alias at the new version once it is stored.
            progress: Called as ``progress(bytes_sent, total_bytes)`` as chunks go out (from gRPC's thread). If it
                raises, the upload is cancelled, nothing is stored, and push raises that exception.
            chunk_bytes: Bytes per message.

        Returns:
            The new version (with the alias, when one was set).

        Warns:
            UnservedOutputsWarning: some of the model's outputs are not tensors ModelForge serves (a scikit-learn
                classifier's ZipMap, a list of dicts), so predictions leave them out.

        Raises:
            ValueError: the name or the alias is malformed; nothing is sent.
            InvalidArgumentError: the file is not valid ONNX, or it changed while being sent.
            ResourceExhaustedError: the file is larger than the registry accepts.
            ModelForgeError: the version was stored but setting the alias failed: the error of that call, of its
                kind (DeadlineExceededError...), saying ``pushed NAME:N, but setting alias ALIAS failed: ...``, or
                ``... but whether alias ALIAS was set is unknown: ...`` when the call ran out of time or was
                cancelled. The version stays; set the alias with :meth:`set_alias` rather than pushing again.
        """
        validate_model_name(name)  # before the file is hashed and sent, as the alias
        _check_source(source)
        _check_chunk(chunk_bytes)
        if alias is not None:
            validate_alias(alias)  # before the upload: a version whose alias is refused afterwards would stay
        if isinstance(source, bytes | bytearray | memoryview):
            data = source
            sha256 = _convert.sha256_of_bytes(data)
            plan = _upload_plan(name, sha256, len(data), create_model, description, labels, version_label, progress)
            requests: Iterator[pb.UploadModelVersionRequest] = plan.requests_from_bytes(data, chunk_bytes)
        else:
            sha256, size = _convert.hash_file(source)
            plan = _upload_plan(name, sha256, size, create_model, description, labels, version_label, progress)
            requests = self._file_requests(plan, Path(source), chunk_bytes)
        try:
            with _convert.reported(plan.progress), translated():
                response = self.registry_stub.UploadModelVersion(requests)
        except ModelForgeError as exc:
            raise _upload_failed(exc, plan) from exc
        version = _convert.model_version(response.model_version)
        _warn_of_unserved_outputs(version)
        if alias is not None:
            try:
                version = self.set_alias(name, alias, version.version)
            except ModelForgeError as exc:
                raise _alias_not_set(exc, version, alias) from exc
        return version

    @staticmethod
    def _file_requests(plan: _convert.UploadPlan, path: Path, chunk_bytes: int) -> Iterator[Any]:
        yield plan.first()
        with path.open("rb") as f:
            while data := f.read(chunk_bytes):
                yield plan.chunk(data)

    def resolve(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> ModelVersion:
        """Returns the version a reference points at: ``"name:3"``, ``"name@production"``, or ``"name"`` (newest READY).

        Raises:
            NotFoundError: no such model, version or alias, or the model has no READY version.
            ValueError: the reference string is malformed (before any call).
        """
        request = pb.ResolveModelRefRequest(ref=_convert.ref_proto(ref))
        with translated():
            response = self.registry_stub.ResolveModelRef(request, timeout=call_timeout(timeout, self.timeout))
        return _convert.model_version(response.model_version)

    def _number(self, ref: str | ModelRef) -> tuple[str, int]:
        parsed = _one_version(ref)
        if parsed.version is not None:
            return parsed.name, parsed.version
        return parsed.name, self.resolve(parsed).version

    def list_versions(
        self,
        name: str,
        *,
        state: VersionState | str | None = None,
        page_size: int = 100,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Iterator[ModelVersion]:
        """Iterates over a model's versions, newest first, fetching pages lazily.

        Args:
            name: The model.
            state: Only versions in this state (``"READY"`` or ``"ARCHIVED"``); None for all.
            page_size: Versions per request (the server caps it at 500).
        """
        token = ""
        model = validate_model_name(name)
        state_value = _convert.version_state_proto(state)
        while True:
            request = pb.ListModelVersionsRequest(
                model=model,
                page_size=_convert.whole_number(page_size, "page_size"),
                page_token=token,
                state=state_value,
            )
            with translated():
                page = self.registry_stub.ListModelVersions(request, timeout=call_timeout(timeout, self.timeout))
            yield from (_convert.model_version(v) for v in page.model_versions)
            if not (token := page.next_page_token):
                return

    def update_version(
        self,
        ref: str | ModelRef,
        *,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        version_label: str | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> ModelVersion:
        """Changes a version's description, labels and/or version label (those passed). ``ref`` is ``name:N`` or
        ``name@alias``; a bare name is ValueError."""
        name, number = self._number(ref)
        request = _convert.update_version_request(
            name, number, description=description, labels=labels, version_label=version_label
        )
        with translated():
            response = self.registry_stub.UpdateModelVersion(request, timeout=call_timeout(timeout, self.timeout))
        return _convert.model_version(response.model_version)

    def archive(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> ModelVersion:
        """Archives a version (``name:N`` or ``name@alias``; a bare name is ValueError): it stops being "latest"
        and no alias may point at it.

        Raises:
            FailedPreconditionError: an alias points at the version; move or delete the alias first.
        """
        name, number = self._number(ref)
        with translated():
            response = self.registry_stub.ArchiveModelVersion(
                pb.ArchiveModelVersionRequest(model=name, version=number), timeout=call_timeout(timeout, self.timeout)
            )
        return _convert.model_version(response.model_version)

    def restore(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> ModelVersion:
        """Makes an archived version (``name:N``) READY again."""
        name, number = self._number(ref)
        with translated():
            response = self.registry_stub.RestoreModelVersion(
                pb.RestoreModelVersionRequest(model=name, version=number), timeout=call_timeout(timeout, self.timeout)
            )
        return _convert.model_version(response.model_version)

    def delete_version(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> bool:
        """Deletes a version for good (its number is never reused); True if its file was removed too. ``ref`` is
        ``name:N`` or ``name@alias``: a bare name is ValueError, as it would delete whichever version is newest.

        Raises:
            FailedPreconditionError: an alias points at the version.
        """
        name, number = self._number(ref)
        with translated():
            response = self.registry_stub.DeleteModelVersion(
                pb.DeleteModelVersionRequest(model=name, version=number), timeout=call_timeout(timeout, self.timeout)
            )
        return bool(response.blob_deleted)

    # --- aliases ---

    def set_alias(self, name: str, alias: str, version: int, *, timeout: Timeout = CLIENT_TIMEOUT) -> ModelVersion:
        """Points ``alias`` at a READY version of the model, creating or moving it atomically.

        Raises:
            FailedPreconditionError: the version is archived.
        """
        with translated():
            response = self.registry_stub.SetAlias(
                pb.SetAliasRequest(
                    model=validate_model_name(name), alias=validate_alias(alias), version=validate_version(version)
                ),
                timeout=call_timeout(timeout, self.timeout),
            )
        return _convert.model_version(response.model_version)

    def delete_alias(self, name: str, alias: str, *, timeout: Timeout = CLIENT_TIMEOUT) -> int:
        """Removes an alias and returns the version it pointed at. Raises NotFoundError if there is no such alias."""
        with translated():
            response = self.registry_stub.DeleteAlias(
                pb.DeleteAliasRequest(model=validate_model_name(name), alias=validate_alias(alias)),
                timeout=call_timeout(timeout, self.timeout),
            )
        return int(response.previous_version)

    # --- files and events ---

    def download(
        self, ref: str | ModelRef, path: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> ModelVersion:
        """Downloads a version's file, verifying its size and sha256 before it appears at ``path``.

        Args:
            ref: The version (an alias or a bare name is resolved by the registry).
            path: The file to write, or a directory (existing, or ending in ``/``) to write ``<name>.onnx`` into.
                Replaced atomically.
            progress: Called as ``progress(bytes_received, total_bytes)``.

        Returns:
            The version that was downloaded.

        Raises:
            IntegrityError: the bytes received do not match the size or sha256; nothing is written.
        """
        landing = _Landing(_target_file(path, ref))
        check = _convert.DownloadCheck(progress=progress)
        request = pb.DownloadModelVersionRequest(ref=_convert.ref_proto(ref))
        try:
            with translated():
                for message in self.registry_stub.DownloadModelVersion(request):
                    data = check.accept(message)
                    landing.file().write(data)  # made at the header: a refused download makes nothing
            version = check.finish()
            landing.commit()
        except BaseException:
            landing.discard()
            raise
        return version

    def watch(self, *, model: str = "") -> Iterator[ModelEvent]:
        """Iterates over changes to models, versions and aliases as they happen, until you stop iterating.

        The first event is always WATCH_STARTED: from then on no change is missed.

        Args:
            model: Only events of this model; ``""`` for all.
        """
        with translated():  # a closed client fails here, before the call exists
            call = self.registry_stub.WatchModelEvents(
                pb.WatchModelEventsRequest(model=validate_model_name(model) if model else "")
            )
        try:
            with translated():
                for message in call:
                    yield _convert.model_event(message.event)
        finally:
            call.cancel()


class AsyncRegistryClient(AsyncChannelClient):
    """The asyncio twin of :class:`RegistryClient`: the same methods, awaited.

    Use it as an async context manager, or ``await client.close()``::

        async with AsyncRegistryClient() as registry:
            version = await registry.push("model.onnx", name="fraud")
            async for model in registry.list_models():
                print(model.name)

    Args:
        target: ``host:port`` of the registry; defaults to ``MODELFORGE_REGISTRY_ADDRESS``, else
            ``127.0.0.1:50051``.
        channel: A ``grpc.aio`` channel of your own; the client does not close it. Excludes ``target``.
        timeout: Seconds allowed for each unary call; None for no limit. A method's own ``timeout=`` replaces it
            for that call.
        max_message_bytes: Largest message sent or received; None for what the service takes and gives with its
            default settings, 64 MiB.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int | None = None,
    ) -> None:
        super().__init__(REGISTRY, target, channel, max_message_bytes)
        self.timeout = timeout
        """Seconds allowed for each call whose own ``timeout=`` says nothing else; None for no limit."""
        self.registry_stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        """The generated stub over this client's channel, for calls the client does not wrap."""

    # --- models ---

    async def create_model(
        self,
        name: str,
        *,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Model:
        """See :meth:`RegistryClient.create_model`."""
        request = pb.CreateModelRequest(
            model=pb.Model(name=validate_model_name(name), description=description, labels=labels or {})
        )
        with self._translated():
            response = await self.registry_stub.CreateModel(request, timeout=call_timeout(timeout, self.timeout))
        return _convert.model(response.model)

    async def get_model(self, name: str, *, timeout: Timeout = CLIENT_TIMEOUT) -> Model:
        """See :meth:`RegistryClient.get_model`."""
        with self._translated():
            response = await self.registry_stub.GetModel(
                pb.GetModelRequest(name=validate_model_name(name)), timeout=call_timeout(timeout, self.timeout)
            )
        return _convert.model(response.model)

    async def list_models(
        self,
        *,
        name_prefix: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 100,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> AsyncIterator[Model]:
        """See :meth:`RegistryClient.list_models`; iterate with ``async for``."""
        token = ""
        while True:
            request = _convert.list_models_request(
                name_prefix=name_prefix,
                labels=labels,
                page_size=_convert.whole_number(page_size, "page_size"),
                page_token=token,
            )
            with self._translated():
                page = await self.registry_stub.ListModels(request, timeout=call_timeout(timeout, self.timeout))
            for m in page.models:
                yield _convert.model(m)
            if not (token := page.next_page_token):
                return

    async def update_model(
        self,
        name: str,
        *,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> Model:
        """See :meth:`RegistryClient.update_model`."""
        request = _convert.update_model_request(name, description=description, labels=labels)
        with self._translated():
            response = await self.registry_stub.UpdateModel(request, timeout=call_timeout(timeout, self.timeout))
        return _convert.model(response.model)

    async def delete_model(self, name: str, *, force: bool = False, timeout: Timeout = CLIENT_TIMEOUT) -> int:
        """See :meth:`RegistryClient.delete_model`."""
        with self._translated():
            response = await self.registry_stub.DeleteModel(
                pb.DeleteModelRequest(name=validate_model_name(name), force=force),
                timeout=call_timeout(timeout, self.timeout),
            )
        return int(response.deleted_versions)

    # --- versions ---

    async def push(
        self,
        source: Source,
        *,
        name: str,
        create_model: bool = True,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        version_label: str = "",
        alias: str | None = None,
        progress: Progress | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> ModelVersion:
        """See :meth:`RegistryClient.push`. Hashing and file reads run in a thread; progress is called on the loop."""
        validate_model_name(name)  # before the file is hashed and sent, as the alias
        _check_source(source)
        _check_chunk(chunk_bytes)
        if alias is not None:
            validate_alias(alias)  # before the upload: a version whose alias is refused afterwards would stay
        requests: Any
        if isinstance(source, bytes | bytearray | memoryview):
            data = source
            sha256 = await asyncio.to_thread(_convert.sha256_of_bytes, data)
            plan = _upload_plan(name, sha256, len(data), create_model, description, labels, version_label, progress)
            requests = plan.requests_from_bytes(data, chunk_bytes)
        else:
            sha256, size = await asyncio.to_thread(_convert.hash_file, source)
            plan = _upload_plan(name, sha256, size, create_model, description, labels, version_label, progress)
            requests = self._file_requests(plan, Path(source), chunk_bytes)
        try:
            with _convert.reported(plan.progress), self._translated():
                response = await self.registry_stub.UploadModelVersion(requests)
        except ModelForgeError as exc:
            raise _upload_failed(exc, plan) from exc
        version = _convert.model_version(response.model_version)
        _warn_of_unserved_outputs(version)
        if alias is not None:
            try:
                version = await self.set_alias(name, alias, version.version)
            except ModelForgeError as exc:
                raise _alias_not_set(exc, version, alias) from exc
        return version

    @staticmethod
    async def _file_requests(plan: _convert.UploadPlan, path: Path, chunk_bytes: int) -> AsyncIterator[Any]:
        yield plan.first()
        with path.open("rb") as f:
            while data := await asyncio.to_thread(f.read, chunk_bytes):
                yield plan.chunk(data)

    async def resolve(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> ModelVersion:
        """See :meth:`RegistryClient.resolve`."""
        request = pb.ResolveModelRefRequest(ref=_convert.ref_proto(ref))
        with self._translated():
            response = await self.registry_stub.ResolveModelRef(request, timeout=call_timeout(timeout, self.timeout))
        return _convert.model_version(response.model_version)

    async def _number(self, ref: str | ModelRef) -> tuple[str, int]:
        parsed = _one_version(ref)
        if parsed.version is not None:
            return parsed.name, parsed.version
        return parsed.name, (await self.resolve(parsed)).version

    async def list_versions(
        self,
        name: str,
        *,
        state: VersionState | str | None = None,
        page_size: int = 100,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> AsyncIterator[ModelVersion]:
        """See :meth:`RegistryClient.list_versions`; iterate with ``async for``."""
        token = ""
        model = validate_model_name(name)
        state_value = _convert.version_state_proto(state)
        while True:
            request = pb.ListModelVersionsRequest(
                model=model,
                page_size=_convert.whole_number(page_size, "page_size"),
                page_token=token,
                state=state_value,
            )
            with self._translated():
                page = await self.registry_stub.ListModelVersions(request, timeout=call_timeout(timeout, self.timeout))
            for v in page.model_versions:
                yield _convert.model_version(v)
            if not (token := page.next_page_token):
                return

    async def update_version(
        self,
        ref: str | ModelRef,
        *,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        version_label: str | None = None,
        timeout: Timeout = CLIENT_TIMEOUT,
    ) -> ModelVersion:
        """See :meth:`RegistryClient.update_version`."""
        name, number = await self._number(ref)
        request = _convert.update_version_request(
            name, number, description=description, labels=labels, version_label=version_label
        )
        with self._translated():
            response = await self.registry_stub.UpdateModelVersion(request, timeout=call_timeout(timeout, self.timeout))
        return _convert.model_version(response.model_version)

    async def archive(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> ModelVersion:
        """See :meth:`RegistryClient.archive`."""
        name, number = await self._number(ref)
        with self._translated():
            response = await self.registry_stub.ArchiveModelVersion(
                pb.ArchiveModelVersionRequest(model=name, version=number), timeout=call_timeout(timeout, self.timeout)
            )
        return _convert.model_version(response.model_version)

    async def restore(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> ModelVersion:
        """See :meth:`RegistryClient.restore`."""
        name, number = await self._number(ref)
        with self._translated():
            response = await self.registry_stub.RestoreModelVersion(
                pb.RestoreModelVersionRequest(model=name, version=number), timeout=call_timeout(timeout, self.timeout)
            )
        return _convert.model_version(response.model_version)

    async def delete_version(self, ref: str | ModelRef, *, timeout: Timeout = CLIENT_TIMEOUT) -> bool:
        """See :meth:`RegistryClient.delete_version`."""
        name, number = await self._number(ref)
        with self._translated():
            response = await self.registry_stub.DeleteModelVersion(
                pb.DeleteModelVersionRequest(model=name, version=number), timeout=call_timeout(timeout, self.timeout)
            )
        return bool(response.blob_deleted)

    # --- aliases ---

    async def set_alias(
        self, name: str, alias: str, version: int, *, timeout: Timeout = CLIENT_TIMEOUT
    ) -> ModelVersion:
        """See :meth:`RegistryClient.set_alias`."""
        with self._translated():
            response = await self.registry_stub.SetAlias(
                pb.SetAliasRequest(
                    model=validate_model_name(name), alias=validate_alias(alias), version=validate_version(version)
                ),
                timeout=call_timeout(timeout, self.timeout),
            )
        return _convert.model_version(response.model_version)

    async def delete_alias(self, name: str, alias: str, *, timeout: Timeout = CLIENT_TIMEOUT) -> int:
        """See :meth:`RegistryClient.delete_alias`."""
        with self._translated():
            response = await self.registry_stub.DeleteAlias(
                pb.DeleteAliasRequest(model=validate_model_name(name), alias=validate_alias(alias)),
                timeout=call_timeout(timeout, self.timeout),
            )
        return int(response.previous_version)

    # --- files and events ---

    async def download(
        self, ref: str | ModelRef, path: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> ModelVersion:
        """See :meth:`RegistryClient.download`. File writes run in a thread."""
        landing = _Landing(_target_file(path, ref))
        check = _convert.DownloadCheck(progress=progress)
        request = pb.DownloadModelVersionRequest(ref=_convert.ref_proto(ref))
        try:
            with self._translated():
                async for message in self.registry_stub.DownloadModelVersion(request):
                    data = check.accept(message)
                    # Made here at the header, not on a thread: a call cancelled while a thread made the file would
                    # leave it behind.
                    out = landing.file()
                    if data:
                        await asyncio.to_thread(out.write, data)
            version = check.finish()
            await asyncio.to_thread(landing.commit)
        except BaseException:
            landing.discard()
            raise
        return version

    async def watch(self, *, model: str = "") -> AsyncIterator[ModelEvent]:
        """See :meth:`RegistryClient.watch`; iterate with ``async for``."""
        with self._translated():  # a closed client fails here, before the call exists
            call = self.registry_stub.WatchModelEvents(
                pb.WatchModelEventsRequest(model=validate_model_name(model) if model else "")
            )
        try:
            with self._translated():
                async for message in call:
                    yield _convert.model_event(message.event)
        finally:
            call.cancel()
