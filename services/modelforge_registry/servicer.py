"""Translates RegistryService RPCs to ModelRegistry calls; holds no logic of its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.message import Message

from modelforge.registry.v1 import registry_pb2, registry_pb2_grpc
from modelforge_registry import convert
from modelforge_registry.domain import ModelFilter, NewModel, Page, model_key, version_key
from modelforge_registry.registry import ModelRegistry
from modelforge_server import paging
from modelforge_server.errors import UploadOutOfOrder, require

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
T = TypeVar("T")
P = TypeVar("P", bound=Message)


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """The gRPC face of ModelRegistry.

    `max_message_bytes`: the largest answer; a page of models or versions is cut short to fit in it.
    """

    def __init__(self, registry: ModelRegistry, *, max_message_bytes: int) -> None:
        self._registry = registry
        self._page_bytes = max(max_message_bytes - paging.PAGE_OVERHEAD_BYTES, 1)

    async def CreateModel(
        self, request: registry_pb2.CreateModelRequest, context: Context
    ) -> registry_pb2.CreateModelResponse:
        new = NewModel(
            name=require(request.model.name, "model.name"),
            description=request.model.description,
            labels=dict(request.model.labels),
        )
        model = await self._registry.create_model(new)
        return registry_pb2.CreateModelResponse(model=convert.model_to_proto(model))

    async def GetModel(self, request: registry_pb2.GetModelRequest, context: Context) -> registry_pb2.GetModelResponse:
        model = await self._registry.get_model(require(request.name, "name"))
        return registry_pb2.GetModelResponse(model=convert.model_to_proto(model))

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: Context
    ) -> registry_pb2.ListModelsResponse:
        page = await self._registry.list_models(
            ModelFilter(name_prefix=request.name_prefix, labels=dict(request.labels)),
            limit=paging.page_size(request.page_size),
            after=paging.decode(request.page_token, (str,), request),  # the last name
        )
        models, token = self._fitted(page, convert.model_to_proto, model_key, request)
        return registry_pb2.ListModelsResponse(models=models, next_page_token=token)

    async def UpdateModel(
        self, request: registry_pb2.UpdateModelRequest, context: Context
    ) -> registry_pb2.UpdateModelResponse:
        name = require(request.model.name, "model.name")
        model = await self._registry.update_model(name, convert.model_changes(request.model, request.update_mask))
        return registry_pb2.UpdateModelResponse(model=convert.model_to_proto(model))

    async def DeleteModel(
        self, request: registry_pb2.DeleteModelRequest, context: Context
    ) -> registry_pb2.DeleteModelResponse:
        deleted = await self._registry.delete_model(require(request.name, "name"), force=request.force)
        return registry_pb2.DeleteModelResponse(deleted_versions=deleted)

    async def UploadModelVersion(
        self, request_iterator: AsyncIterator[registry_pb2.UploadModelVersionRequest], context: Context
    ) -> registry_pb2.UploadModelVersionResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("content") != "header":
            raise UploadOutOfOrder("the first message of an upload must carry the header, and only the header")
        header = convert.header_from_proto(first.header)
        version = await self._registry.upload(header, _chunks(request_iterator))
        return registry_pb2.UploadModelVersionResponse(model_version=convert.version_to_proto(version))

    async def GetModelVersion(
        self, request: registry_pb2.GetModelVersionRequest, context: Context
    ) -> registry_pb2.GetModelVersionResponse:
        version = await self._registry.get_version(require(request.model, "model"), request.version)
        return registry_pb2.GetModelVersionResponse(model_version=convert.version_to_proto(version))

    async def ResolveModelRef(
        self, request: registry_pb2.ResolveModelRefRequest, context: Context
    ) -> registry_pb2.ResolveModelRefResponse:
        require(request.ref.name, "ref.name")
        version = await self._registry.resolve(convert.ref_from_proto(request.ref))
        return registry_pb2.ResolveModelRefResponse(model_version=convert.version_to_proto(version))

    async def ListModelVersions(
        self, request: registry_pb2.ListModelVersionsRequest, context: Context
    ) -> registry_pb2.ListModelVersionsResponse:
        page = await self._registry.list_versions(
            require(request.model, "model"),
            convert.state_from_proto(request.state),
            limit=paging.page_size(request.page_size),
            after=paging.decode(request.page_token, (int,), request),  # the last version number
        )
        versions, token = self._fitted(page, convert.version_to_proto, version_key, request)
        return registry_pb2.ListModelVersionsResponse(model_versions=versions, next_page_token=token)

    async def UpdateModelVersion(
        self, request: registry_pb2.UpdateModelVersionRequest, context: Context
    ) -> registry_pb2.UpdateModelVersionResponse:
        target = request.model_version
        version = await self._registry.update_version(
            require(target.model, "model_version.model"),
            target.version,
            convert.version_changes(target, request.update_mask),
        )
        return registry_pb2.UpdateModelVersionResponse(model_version=convert.version_to_proto(version))

    async def ArchiveModelVersion(
        self, request: registry_pb2.ArchiveModelVersionRequest, context: Context
    ) -> registry_pb2.ArchiveModelVersionResponse:
        version = await self._registry.archive(require(request.model, "model"), request.version)
        return registry_pb2.ArchiveModelVersionResponse(model_version=convert.version_to_proto(version))

    async def RestoreModelVersion(
        self, request: registry_pb2.RestoreModelVersionRequest, context: Context
    ) -> registry_pb2.RestoreModelVersionResponse:
        version = await self._registry.restore(require(request.model, "model"), request.version)
        return registry_pb2.RestoreModelVersionResponse(model_version=convert.version_to_proto(version))

    async def DeleteModelVersion(
        self, request: registry_pb2.DeleteModelVersionRequest, context: Context
    ) -> registry_pb2.DeleteModelVersionResponse:
        blob_deleted = await self._registry.delete_version(require(request.model, "model"), request.version)
        return registry_pb2.DeleteModelVersionResponse(blob_deleted=blob_deleted)

    async def SetAlias(self, request: registry_pb2.SetAliasRequest, context: Context) -> registry_pb2.SetAliasResponse:
        version, previous = await self._registry.set_alias(
            require(request.model, "model"), require(request.alias, "alias"), request.version
        )
        return registry_pb2.SetAliasResponse(model_version=convert.version_to_proto(version), previous_version=previous)

    async def DeleteAlias(
        self, request: registry_pb2.DeleteAliasRequest, context: Context
    ) -> registry_pb2.DeleteAliasResponse:
        previous = await self._registry.delete_alias(require(request.model, "model"), require(request.alias, "alias"))
        return registry_pb2.DeleteAliasResponse(previous_version=previous)

    async def DownloadModelVersion(
        self, request: registry_pb2.DownloadModelVersionRequest, context: Context
    ) -> AsyncIterator[registry_pb2.DownloadModelVersionResponse]:
        require(request.ref.name, "ref.name")
        version, chunks = await self._registry.download(convert.ref_from_proto(request.ref))
        async with contextlib.aclosing(chunks):  # closes the file even when the client goes away mid-stream
            yield registry_pb2.DownloadModelVersionResponse(model_version=convert.version_to_proto(version))
            async for chunk in chunks:
                yield registry_pb2.DownloadModelVersionResponse(chunk=chunk)

    async def WatchModelEvents(
        self, request: registry_pb2.WatchModelEventsRequest, context: Context
    ) -> AsyncIterator[registry_pb2.WatchModelEventsResponse]:
        async for event in self._registry.watch(request.model):
            yield registry_pb2.WatchModelEventsResponse(event=convert.event_to_proto(event))

    def _fitted(
        self, page: Page[T], to_proto: Callable[[T], P], key: Callable[[T], list[object]], request: Message
    ) -> tuple[list[P], str]:
        """A page's items as protos, cut to what fits in one answer, and the token of the page after them."""
        items = [to_proto(item) for item in page.items]
        kept = paging.fitting(items, self._page_bytes)
        last_key = key(page.items[kept - 1]) if kept < len(items) else page.last_key
        return items[:kept], paging.encode(last_key, request) if last_key else ""


async def _chunks(requests: AsyncIterator[registry_pb2.UploadModelVersionRequest]) -> AsyncIterator[bytes]:
    async for request in requests:
        if request.WhichOneof("content") != "chunk":
            raise UploadOutOfOrder("only the first message of an upload carries a header; the others carry chunks")
        yield request.chunk
