"""Server reflection that serves the proto comments, so `grpcurl describe` shows them.

grpcio-reflection serializes descriptors from the generated pool, whose files carry no
SourceCodeInfo (docs/transport.md section 3.2); its private hooks change between
releases. So this answers ServerReflectionInfo itself, from the descriptor set that
scripts/gen_proto.py writes with --include_source_info (xensim/v1/xensim.binpb, which also
holds the google/rpc files it imports); other services' files (health, reflection) come from
their generated modules. It also resolves `Service.Method` symbols, which the stock servicer
does not (grpc/grpc#34743).
"""

from collections.abc import Iterable
from importlib.resources import files

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

DESCRIPTOR_SET = files("xensim.v1") / "xensim.binpb"


class Reflection(reflection_pb2_grpc.ServerReflectionServicer):
    def __init__(self, service_names: Iterable[str], generated: Iterable[FileDescriptor]):
        self._services = sorted(service_names)
        self._pool = descriptor_pool.DescriptorPool()
        self._files: dict[str, bytes] = {}
        for proto in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file:
            self._add(proto)
        for file in generated:
            self._add_generated(file)

    def _add(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self._pool.Add(proto)
        self._files[proto.name] = proto.SerializeToString()

    def _add_generated(self, file: FileDescriptor) -> None:
        if file.name in self._files:
            return
        for dependency in file.dependencies:
            self._add_generated(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        self._add(proto)

    async def ServerReflectionInfo(self, request_iterator, context: grpc.aio.ServicerContext):
        async for request in request_iterator:
            yield self._answer(request)

    def _answer(self, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                services = [reflection_pb2.ServiceResponse(name=name) for name in self._services]
                return reflection_pb2.ServerReflectionResponse(original_request=request, list_services_response=reflection_pb2.ListServiceResponse(service=services))
            if kind == "file_by_filename":
                return self._file_response(request, self._pool.FindFileByName(request.file_by_filename))
            if kind == "file_containing_symbol":
                return self._file_response(request, self._file_of_symbol(request.file_containing_symbol))
            if kind == "file_containing_extension":
                wanted = request.file_containing_extension
                extended = self._pool.FindMessageTypeByName(wanted.containing_type)
                return self._file_response(request, self._pool.FindExtensionByNumber(extended, wanted.extension_number).file)
            if kind == "all_extension_numbers_of_type":
                # grpcurl asks this before it decodes an Any (e.g. ErrorInfo in error details);
                # an error here would leave the details undecoded.
                extended = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(e.number for e in self._pool.FindAllExtensions(extended))
                extensions = reflection_pb2.ExtensionNumberResponse(base_type_name=extended.full_name, extension_number=numbers)
                return reflection_pb2.ServerReflectionResponse(original_request=request, all_extension_numbers_response=extensions)
        except KeyError:
            pass
        error = reflection_pb2.ErrorResponse(error_code=grpc.StatusCode.NOT_FOUND.value[0], error_message=f"{kind}: not found")
        return reflection_pb2.ServerReflectionResponse(original_request=request, error_response=error)

    def _file_of_symbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            found = self._pool.FindServiceByName(service)
            if method not in found.methods_by_name:
                raise
            return found.file

    def _file_response(self, request, file: FileDescriptor) -> reflection_pb2.ServerReflectionResponse:
        """The file and everything it imports, as grpcurl needs them to decode messages."""
        seen: dict[str, bytes] = {}
        stack = [file]
        while stack:
            current = stack.pop()
            if current.name not in seen:
                seen[current.name] = self._files[current.name]
                stack.extend(current.dependencies)
        response = reflection_pb2.FileDescriptorResponse(file_descriptor_proto=list(seen.values()))
        return reflection_pb2.ServerReflectionResponse(original_request=request, file_descriptor_response=response)
