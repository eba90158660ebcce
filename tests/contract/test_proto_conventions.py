"""The wire contract keeps the conventions its readers rely on.

Every service, method, message, field, oneof, enum and enum value carries a leading comment
(grpcurl describe shows them through the server's reflection); enums follow the protobuf style
guide; the Session's call and result cases pair up; the documented batch limit is the core's.
"""

import pathlib
import re

from google.protobuf import descriptor_pb2

from hypervisor.core import abi
from xensim.v1 import hypercalls_pb2

DESCRIPTOR_SET = pathlib.Path(__file__).resolve().parents[2] / "xensim" / "v1" / "xensim.binpb"

# FileDescriptorProto / DescriptorProto / EnumDescriptorProto / ServiceDescriptorProto field
# numbers, as SourceCodeInfo.Location.path uses them (google/protobuf/descriptor.proto).
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2


def _xensim_files() -> list[descriptor_pb2.FileDescriptorProto]:
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file
    return [f for f in files if f.package == "xensim.v1"]


def _elements(file: descriptor_pb2.FileDescriptorProto):
    """Yield (full name, source path) for every element that needs a comment."""

    def enum(e, path, scope):
        yield f"{scope}.{e.name}", path
        for j, v in enumerate(e.value):
            yield f"{scope}.{e.name}.{v.name}", path + (ENUM_VALUE, j)

    def message(m, path, scope):
        name = f"{scope}.{m.name}"
        yield name, path
        for j, f in enumerate(m.field):
            yield f"{name}.{f.name}", path + (MESSAGE_FIELD, j)
        for j, o in enumerate(m.oneof_decl):
            if not o.name.startswith("_"):  # synthetic oneof of a proto3 `optional` field
                yield f"{name}.{o.name} (oneof)", path + (MESSAGE_ONEOF, j)
        for j, nested in enumerate(m.nested_type):
            yield from message(nested, path + (MESSAGE_NESTED, j), name)
        for j, e in enumerate(m.enum_type):
            yield from enum(e, path + (MESSAGE_ENUM, j), name)

    for i, m in enumerate(file.message_type):
        yield from message(m, (FILE_MESSAGE, i), file.package)
    for i, e in enumerate(file.enum_type):
        yield from enum(e, (FILE_ENUM, i), file.package)
    for i, s in enumerate(file.service):
        yield f"{file.package}.{s.name}", (FILE_SERVICE, i)
        for j, method in enumerate(s.method):
            yield f"{file.package}.{s.name}.{method.name}", (FILE_SERVICE, i, SERVICE_METHOD, j)


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}


def test_descriptor_set_carries_every_xensim_file_with_source_info():
    names = {f.name for f in _xensim_files()}
    protos = {f"xensim/v1/{p.name}" for p in (DESCRIPTOR_SET.parents[2] / "proto" / "xensim" / "v1").glob("*.proto")}
    assert names == protos
    assert all(f.source_code_info.location for f in _xensim_files())


def test_every_service_method_message_field_enum_and_value_has_a_leading_comment():
    uncommented = []
    for file in _xensim_files():
        comments = _comments(file)
        uncommented += [f"{file.name}: {name}" for name, path in _elements(file) if not comments.get(path)]
    assert not uncommented, "add a leading comment (grpcurl describe shows it) to:\n" + "\n".join(uncommented)


def test_enums_start_at_unspecified_zero_and_prefix_values_with_their_name():
    for file in _xensim_files():
        for e in file.enum_type:
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", e.name).upper() + "_"
            assert e.value[0].number == 0 and e.value[0].name == f"{prefix}UNSPECIFIED", e.name
            assert [v.name for v in e.value if not v.name.startswith(prefix)] == [], e.name


def test_session_call_and_result_cases_pair_up_by_name_and_number():
    def cases(message, oneof):
        return {f.name: f.number for f in message.DESCRIPTOR.oneofs_by_name[oneof].fields}

    call = cases(hypercalls_pb2.Call, "call")
    assert cases(hypercalls_pb2.CallResult, "result") == call
    entry = cases(hypercalls_pb2.MulticallEntry, "call")
    assert entry.items() <= call.items() and "multicall" in entry  # which Xen refuses (do_multicall), but a guest may send


def test_batched_calls_document_the_cores_max_batch():
    file = next(f for f in _xensim_files() if f.name == "xensim/v1/hypercalls.proto")
    comments = _comments(file)
    batched = {"MmuUpdateRequest", "MmuextOpRequest", "MulticallRequest"}
    documented = {m.name for i, m in enumerate(file.message_type)
                  if f"0 to {abi.MAX_BATCH} of them" in comments.get((FILE_MESSAGE, i, MESSAGE_FIELD, 0), "")}
    assert batched <= documented
