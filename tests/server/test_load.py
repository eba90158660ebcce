"""Load: 64 vCPU streams of 8 domains, from 8 client processes, hammering hypercalls and IPIs
at once (xensim/bench/load.py, run shorter than the benchmark's 10 s). No stream starves, every
vCPU takes IPIs, the server's memory stays flat, and the machine audits clean (`measure`
raises otherwise).

Fairness (min over median rate) and p99 latency are the benchmark's figures, not asserted
here: on a shared 2-core machine the OS, not the server, decides how much CPU each of the 8
client processes gets (a CI run saw 9 vs 112 msg/s between streams). Starvation is asserted
as a count instead: every stream completed round trips and handled IPIs."""

import pytest

from xensim.bench import load

SECONDS = 3.0
MIN_ROUND_TRIPS = 3  # a starved stream makes none; the slowest seen on CI made 28


@pytest.mark.timeout(180)
def test_64_busy_streams_all_progress_fairly_in_flat_memory():
    run = load.measure(SECONDS)
    keys = load.summary(run)
    fairness, p99 = keys["load.streams_64_min_over_median_rate"], keys["load.hypercall_p99_us"]
    print(f"\nload: {fairness['streams']} streams, rates min {fairness['rate_min']:.1f} / median {fairness['rate_median']:.1f} / "
          f"max {fairness['rate_max']:.1f} msg/s, p99 {p99['value'] / 1000:.1f} ms, server RSS {fairness['server_rss_mb_before']:.1f} -> "
          f"{fairness['server_rss_mb_after']:.1f} MB")
    assert fairness["streams"] == load.DOMAINS * load.VCPUS
    assert fairness["round_trips_min"] >= MIN_ROUND_TRIPS and fairness["ipis_handled_min"] > 0
    assert fairness["server_rss_mb_after"] - fairness["server_rss_mb_before"] < 32
