"""The floors that `xensim bench` divides the server's and a vCPU's CPU by answer what the
hypervisor answers: the same bytes, so the ratio compares messages of one size."""

from xensim.bench import rpc
from xensim.bench.client_cpu import TLB_FLUSH_LOCAL
from xensim.v1 import hypercalls_pb2


def test_the_bare_server_answers_the_hypervisors_bytes(vcpu0):
    vcpu0.push()  # VcpuStarted
    vcpu0.send(rpc.SERVER_MESSAGES, TLB_FLUSH_LOCAL)
    answer = vcpu0.answer()
    assert answer.system_time_ns > 0
    answer.system_time_ns = hypercalls_pb2.SessionResponse.FromString(rpc.ANSWER).system_time_ns
    assert answer.SerializeToString() == rpc.ANSWER
