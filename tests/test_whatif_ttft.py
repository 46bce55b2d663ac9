"""
``routing whatif`` with ``max_ttft_ms``: the simulation draws each model's time to first
token from its streamed calls in the window and the real router judges it, so a policy
with a TTFT limit moves traffic to the model that starts streaming in time.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from empathy_models import ConfigurationError, LLMCallRecord, ModelRegistry, Outcome
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.cli.demo import DemoResult, run_demo
from empathy_models.whatif import load_stage_evidence, simulate_policy

from ._cli import run_cli
from ._fakes import list_cost
from .test_router_ttft import ST, WF, info

# "slow" is the cheaper model but starts streaming late
REGISTRY = ModelRegistry(models=(info("slow", 0.2), info("fast", 1.0)), price_version="wt-1")
TTFT = {"slow": 900.0, "fast": 120.0}


def history(now: datetime, *, streamed: bool, per_model: int = 200) -> list[LLMCallRecord]:
    out = []
    for k in range(per_model):
        for model, ttft in TTFT.items():
            out.append(
                LLMCallRecord(
                    provider="openai",
                    model=model,
                    outcome=Outcome.SUCCESS,
                    timestamp=now - timedelta(seconds=60 + 30 * k),
                    workflow=WF,
                    stage=ST,
                    input_tokens=500,
                    output_tokens=100,
                    cost_usd=list_cost(REGISTRY, model, True, 500, 100),
                    latency_ms=1500.0 + k % 7,
                    ttft_ms=ttft * (1.0 + 0.05 * (k % 5)) if streamed else None,
                )
            )
    return out


async def fill(path: Path, *, streamed: bool) -> None:
    async with SQLiteTelemetryBackend(path) as backend:
        await backend.record_many(history(datetime.now(UTC), streamed=streamed))
        await backend.flush()


def shares(report: object) -> dict[str, float]:
    return {t.model: t.share.estimate or 0.0 for t in report.traffic}  # type: ignore[attr-defined]


async def test_a_ttft_limit_moves_the_simulated_traffic_to_the_fast_starter(
    tmp_path: Path,
) -> None:
    path = tmp_path / "calls.db"
    await fill(path, streamed=True)
    async with SQLiteTelemetryBackend(path) as backend:
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY)
    fits = evidence.fits
    assert fits["slow"].ttft_p50_ms == pytest.approx(990.0, rel=0.1)
    assert fits["fast"].ttft_p95_ms is not None and fits["fast"].ttft_p95_ms < 200.0
    opts = {"registry": REGISTRY, "min_success_rate": 0.5, "requests": 100, "replicates": 4}
    plain = await simulate_policy(evidence, **opts)  # type: ignore[arg-type]
    limited = await simulate_policy(evidence, max_ttft_ms=400.0, **opts)  # type: ignore[arg-type]
    assert shares(plain)["slow"] > 0.9  # without the limit, the cheaper model
    assert shares(limited)["fast"] > 0.9 and shares(limited)["slow"] < 0.1
    assert limited.constraints["max_ttft_ms"] == 400.0
    assert limited.cost_per_request.estimate is not None
    assert plain.cost_per_request.estimate is not None
    assert limited.cost_per_request.estimate > plain.cost_per_request.estimate
    # the simulated TTFT p95 is the fast model's, the recorded one the mix of both
    assert limited.ttft_p95_ms.estimate is not None and limited.ttft_p95_ms.estimate < 200.0
    assert plain.ttft_p95_ms.low is not None and plain.ttft_p95_ms.low > 900.0
    assert limited.recorded_ttft_p95_ms is not None
    assert 900.0 < limited.recorded_ttft_p95_ms < 1200.0
    with pytest.raises(ConfigurationError, match="max_ttft_ms"):
        await simulate_policy(evidence, max_ttft_ms=-1.0, **opts)  # type: ignore[arg-type]


async def test_a_stage_never_streamed_proves_no_ttft(tmp_path: Path) -> None:
    path = tmp_path / "calls.db"
    await fill(path, streamed=False)
    async with SQLiteTelemetryBackend(path) as backend:
        evidence = await load_stage_evidence(backend, WF, ST, registry=REGISTRY)
    assert evidence.fits["slow"].ttft_p50_ms is None
    report = await simulate_policy(
        evidence, registry=REGISTRY, max_ttft_ms=400.0, requests=50, replicates=3
    )
    # no model is assumed fast: every request is answered by exploring, none proven
    assert report.unproven_share.estimate == pytest.approx(1.0)
    assert report.no_match_share.estimate == 0.0
    assert report.ttft_p95_ms.estimate is None and report.recorded_ttft_p95_ms is None
    assert any("no call of this stage streamed" in n for n in report.notes)


def test_cli_whatif_takes_max_ttft_ms(tmp_path: Path) -> None:
    import anyio

    path = tmp_path / "calls.db"
    anyio.run(lambda: fill(path, streamed=True))
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps(REGISTRY.to_dict()))
    home = tmp_path / "home"
    args = ("routing", "whatif", WF, ST, "--db", str(path), "--registry", str(registry))
    common = ("--min-success-rate", "0.5", "--requests", "60", "--replicates", "3")
    result = run_cli(home, *args, *common, "--max-ttft-ms", "400", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["constraints"]["max_ttft_ms"] == 400.0
    assert data["traffic"][0]["model"] == "fast"
    by_model = {m["model"]: m for m in data["models"]}
    assert by_model["slow"]["ttft_p50_ms"] == pytest.approx(990.0, rel=0.1)
    table = run_cli(home, *args, *common, "--max-ttft-ms", "400")
    assert table.returncode == 0, table.stderr
    assert "max_ttft_ms=400" in table.stdout
    assert data["ttft_p95_ms"]["estimate"] < 200.0
    assert data["recorded"]["ttft_p95_ms"] > 900.0
    assert "p95 ttft ms" in table.stdout
    bad = run_cli(home, *args, "--max-ttft-ms", "0")
    assert bad.returncode == 2 and "usage:" in bad.stderr


async def test_the_demo_holds_its_streamed_stage_to_a_ttft_limit(tmp_path: Path) -> None:
    def reply(result: DemoResult) -> dict[str, Any]:
        return next(s for s in result.stages if (s["workflow"], s["stage"]) == (WF, ST))

    free = await run_demo(calls=400, seed=3, db_url=f"sqlite:///{tmp_path / 'a.db'}", outage=False)
    held = await run_demo(
        calls=400,
        seed=3,
        db_url=f"sqlite:///{tmp_path / 'b.db'}",
        outage=False,
        constraints={(WF, ST): {"max_ttft_ms": 0.001}},
    )
    assert reply(free)["failed"] == 0
    # no model starts streaming within 1 us: once measured, each is ruled out (raise)
    assert reply(held)["failed"] > 0 and reply(held)["answered"] < reply(free)["answered"]
    with pytest.raises(ConfigurationError, match="max_ttft_ms"):
        await run_demo(
            calls=10,
            seed=3,
            db_url=f"sqlite:///{tmp_path / 'c.db'}",
            constraints={(WF, ST): {"max_ttfb_ms": 1.0}},
        )


def test_cli_best_table_shows_each_candidates_ttft(tmp_path: Path) -> None:
    import anyio

    path = tmp_path / "calls.db"
    anyio.run(lambda: fill(path, streamed=True))
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps(REGISTRY.to_dict()))
    home = tmp_path / "home"
    args = ("routing", "best", WF, ST, "--db", str(path), "--registry", str(registry))
    table = run_cli(home, *args, "--max-ttft-ms", "400", "--min-success-rate", "0.5")
    assert table.returncode == 0, table.stderr
    assert "ttft p95 ms" in table.stdout
    rows = {line.split()[0]: line for line in table.stdout.splitlines() if line.strip()}
    assert "rejected" in rows["slow"] and "time to first token p50" in rows["slow"]
    assert "eligible" in rows["fast"]
