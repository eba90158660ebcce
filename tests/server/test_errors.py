"""The one error mapping agrees with the contract: each XenErrno value's comment in
common.proto names the gRPC code that errors.XEN_CODES gives it."""

import re

from google.protobuf import descriptor_pb2
from google.rpc import code_pb2

from hypervisor.core.abi import Errno
from hypervisor.server.errors import XEN_CODES
from hypervisor.server.reflection import DESCRIPTOR_SET

ENUM, ENUM_VALUE = 5, 2  # FileDescriptorProto.enum_type, EnumDescriptorProto.value


def test_every_xen_errno_maps_to_the_grpc_code_its_proto_comment_names():
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes()).file
    common = next(f for f in files if f.name == "xensim/v1/common.proto")
    index = next(i for i, e in enumerate(common.enum_type) if e.name == "XenErrno")
    values = common.enum_type[index].value
    documented = {}
    for location in common.source_code_info.location:
        path = tuple(location.path)
        if path[:3] == (ENUM, index, ENUM_VALUE) and len(path) == 4 and values[path[3]].number:
            code = re.search(r"gRPC\s+code\s+([A-Z_]+)", location.leading_comments)
            documented[Errno(values[path[3]].number)] = code_pb2.Code.Value(code.group(1))
    assert documented == XEN_CODES
