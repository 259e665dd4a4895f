"""``spendgate price``: the entry a name resolves to, its rates and the cost; one-line errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from spendgate_server.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["price", *argv])
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def test_bedrock_id_shows_its_entry_rates_and_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """A regional Bedrock id resolves to AWS's regional entry: $3.30/$16.50, so 1,000 + 1,000 is $0.0198."""
    code, out, err = run(
        capsys,
        "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
        "--input-tokens",
        "1000",
        "--output-tokens",
        "1000",
    )
    assert (code, err) == (0, "")
    assert "resolved  aws/regional.anthropic.claude-sonnet-4-5-20250929-v1:0  (rule: bedrock)" in out
    assert "input_mtok           $3.3/MTok" in out
    assert out.rstrip().endswith("cost      $0.0198  (19800000 nano-USD)")


def test_one_hour_cache_writes(capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's 1-hour cache writes, through the CLI: $0.60153."""
    code, out, _ = run(
        capsys,
        "claude-sonnet-4-5",
        "--input-tokens=100010",
        "--cache-write-tokens=100000",
        "--cache-write-1h-tokens=100000",
        "--output-tokens=100",
    )
    assert code == 0
    assert "cache_write_1h_tokens       100,000  $0.6" in out
    assert "cost      $0.60153  (601530000 nano-USD)" in out


def test_json_quote(capsys: pytest.CaptureFixture[str]) -> None:
    """--json gives the same quote for scripts."""
    code, out, _ = run(
        capsys, "gpt-5", "--tier", "flex", "--input-tokens", "10", "--web-searches", "2", "--json"
    )
    quote = json.loads(out)
    assert code == 0
    assert (quote["resolved"], quote["tier"], quote["cost_nano_usd"]) == ("openai/gpt-5", "flex", 20_006_250)
    assert quote["rates"]["input_mtok"] == "$0.625/MTok"


def test_json_names_the_standard_tier_as_the_text_does(capsys: pytest.CaptureFixture[str]) -> None:
    """--json listed the default tier as "" while the text said "standard": both say "standard"."""
    code, out, _ = run(capsys, "gpt-5", "--json")
    quote = json.loads(out)
    assert code == 0 and quote["tier"] == "standard" and "" not in quote["tiers"]
    assert quote["tiers"][:2] == ["standard", "batch"]
    _, text, _ = run(capsys, "gpt-5")
    assert f"priced tiers: {', '.join(quote['tiers'])})" in text


def test_unknown_tier_exits_3_and_says_what_was_charged(capsys: pytest.CaptureFixture[str]) -> None:
    """Anthropic's priority tier has no catalogue price: the maximum is shown, and the exit code says so."""
    code, out, _ = run(capsys, "claude-sonnet-4-5", "--tier", "priority", "--input-tokens", "1000")
    assert code == 3
    assert "tier      priority: no known price" in out
    assert "cost      $0.15" in out


def test_override_from_the_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """--config reads the server's prices: overrides, tiers included."""
    config = tmp_path / "spendgate.yaml"
    config.write_text(
        "prices:\n  claude-sonnet-4-5:\n    tiers: {priority: {input_mtok: 6, output_mtok: 30}}\n"
    )
    code, out, _ = run(
        capsys, "claude-sonnet-4-5", "--config", str(config), "--tier", "priority", "--input-tokens", "1000"
    )
    assert code == 0
    assert "resolved  anthropic/claude-sonnet-4-5  (rule: override)" in out
    assert "cost      $0.006  (6000000 nano-USD)" in out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (
            ["no-such-model", "--unknown-model-price", "reject"],
            3,
            "spendgate: no price is known for model 'no-such-model'; add a price override\n",
        ),
        (
            ["claude-sonnet-4-5", "--input-tokens", "10", "--cache-read-tokens", "20"],
            2,
            "spendgate: --cache-read-tokens: 20 is more than input_tokens (10), which includes it\n",
        ),
        (
            ["claude-sonnet-4-5", "--web-searches", "-1"],
            2,
            "spendgate price: argument --web-searches: must be 0 or more, got -1 "
            "(see 'spendgate price --help')\n",
        ),
        (
            ["claude-sonnet-4-5", "--config", "/nonexistent/spendgate.yaml"],
            2,
            "spendgate: --config: cannot read /nonexistent/spendgate.yaml: No such file or directory\n",
        ),
    ],
)
def test_errors_are_one_line_with_their_exit_code(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    """Every refusal is one stderr line naming the problem, nothing on stdout."""
    assert run(capsys, *argv) == (code, "", message)


def test_unknown_model_under_max_policy(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown model is shown with the maximum it is charged, exit 3: never free."""
    code, out, _ = run(capsys, "no-such-model", "--input-tokens", "1000", "--output-tokens", "1000")
    assert code == 3
    assert "resolved  nothing" in out
    assert "cost      $0.75" in out
