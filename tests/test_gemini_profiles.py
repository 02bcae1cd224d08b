"""Profiles, prices, token rules, answer repair and Gemini settings: the pure parts."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from imagestream.analyzer.answers import InvalidOutput, repair
from imagestream.analyzer.answers import parse as parse_answer
from imagestream.analyzer.keypool import parse_keys
from imagestream.analyzer.limiter import QuotaLimits
from imagestream.analyzer.providers.gemini import pricing as gemini_pricing
from imagestream.analyzer.service import load_settings
from imagestream.common import pricing, profiles, settings
from imagestream.devtools import gemini_tokens

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 10},
        "colors": {
            "type": "object",
            "properties": {
                "primary": {"type": "string", "enum": ["red", "blue"]},
                "share": {"type": "number", "minimum": 0, "maximum": 1},
            },
            "required": ["primary"],
        },
        "count": {"type": ["integer", "null"], "minimum": 0},
        "labels": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    },
    "required": ["title", "colors", "count"],
    "propertyOrdering": ["colors", "title"],
}


def write_profile(folder: Path, name: str, **fields: Any) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"prompt": "Look.", "response_schema": SCHEMA, **fields}))
    return path


def test_schema_compiles_to_validation_and_flattened_columns(tmp_path: Path) -> None:
    write_profile(tmp_path, "colors")
    catalog = profiles.load_catalog(str(tmp_path))
    assert {"describe", "moderation", "colors"} <= set(catalog.profiles)
    compiled = catalog.profile("colors")
    assert compiled.columns == [
        "colors.primary", "colors.share", "title", "count", "labels", "blocked", "block_reason",
    ]  # fmt: skip
    good = {"title": "Sky", "colors": {"primary": "blue", "share": 0.5}, "count": None}
    assert compiled.parse(good) == {
        "colors.primary": "blue", "colors.share": 0.5, "title": "Sky", "count": None,
        "blocked": False,
    }  # fmt: skip
    for bad, where in [
        ({**good, "title": "far too long a title"}, "$.title"),
        ({**good, "colors": {"primary": "green"}}, "$.colors.primary"),
        ({**good, "colors": {"primary": "red", "share": 2}}, "$.colors.share"),
        ({**good, "count": -1}, "$.count"),
        ({**good, "labels": ["a", "b", "c"]}, "$.labels"),
        ({"title": "x", "colors": {"primary": "red"}}, "count"),
    ]:
        with pytest.raises(msgspec.ValidationError, match=where.replace("$", r"\$")):
            compiled.parse(bad)
    blocked = compiled.blocked("SAFETY (violence)")
    assert blocked["blocked"] is True and blocked["block_reason"] == "SAFETY (violence)"
    assert set(blocked) == set(compiled.columns)


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({**SCHEMA, "properties": {"a": {"anyOf": []}}, "required": []}, "'anyOf'"),
        ({"type": "array", "items": {"type": "string"}}, "must be an object"),
        ({**SCHEMA, "required": ["nope"]}, "'nope' is not defined"),
        ({**SCHEMA, "properties": {"blocked": {"type": "boolean"}}, "required": []}, "reserved"),
        ({**SCHEMA, "properties": {"a": {"type": "array"}}, "required": []}, "needs 'items'"),
    ],
)
def test_unsupported_schemas_are_refused_naming_file_and_reason(
    tmp_path: Path, schema: dict[str, Any], message: str
) -> None:
    (tmp_path / "odd.json").write_text(json.dumps({"prompt": "p", "response_schema": schema}))
    with pytest.raises(profiles.ProfileError, match=rf"profile odd.json: .*{message}"):
        profiles.load_catalog(str(tmp_path))


def test_profile_key_follows_what_changes_the_answer(tmp_path: Path) -> None:
    def key(**fields: Any) -> str:
        write_profile(tmp_path, "p", **fields)
        return profiles.load_catalog(str(tmp_path)).profile("p").key

    base = key()
    assert base.startswith("p@")
    assert key(description="other words", model="gemini-2.5-flash") == base
    assert key(prompt="Look closer.") != base
    assert key(media_resolution="low") != base
    assert key(max_output_tokens=100) != base


def test_a_user_profile_replaces_a_shipped_one(tmp_path: Path) -> None:
    write_profile(tmp_path, "describe", model="gemini-2.5-flash")
    catalog = profiles.load_catalog(str(tmp_path))
    chosen, model = catalog.choose("describe", None, gemini_pricing.PRICES)
    assert model == "gemini-2.5-flash" and "colors.primary" in chosen.columns


# ------------------------------------------------------------------------------ prices
def test_cost_arithmetic() -> None:
    lite = pricing.price_of("gemini-2.5-flash-lite", gemini_pricing.PRICES)
    # 1M input at $0.10 + 1M output at $0.40.
    assert pricing.cost_usd(lite, input_tokens=10**6, output_tokens=10**6) == pytest.approx(0.5)
    assert pricing.cost_usd(
        lite, input_tokens=10**6, output_tokens=10**6, mode="batch"
    ) == pytest.approx(0.25)
    # Cached prompt tokens at a tenth of the input price.
    assert pricing.cost_usd(
        lite, input_tokens=10**6, output_tokens=0, cached_tokens=10**6
    ) == pytest.approx(0.01)
    pro = pricing.price_of("gemini-2.5-pro", gemini_pricing.PRICES)
    assert pricing.cost_usd(pro, input_tokens=300_000, output_tokens=0) == pytest.approx(0.75)
    # The describe profile as shipped: its expected answer stays under $0.10 per 1,000 images.
    describe = profiles.load_catalog().profile("describe")
    per_image = pricing.cost_usd(
        lite,
        input_tokens=gemini_pricing.input_tokens(describe, "gemini-2.5-flash-lite", 768, 576),
        output_tokens=describe.profile.expected_output_tokens or 0,
    )
    assert 0.05 < per_image * 1000 < 0.10


def test_price_lookup_and_override(tmp_path: Path) -> None:
    assert (
        pricing.find_price("models/gemini-2.5-flash-lite-preview-09-2025", gemini_pricing.PRICES)
        == gemini_pricing.PRICES["gemini-2.5-flash-lite"]
    )
    assert (
        pricing.find_price("gemini-2.5-flash-001", gemini_pricing.PRICES)
        == gemini_pricing.PRICES["gemini-2.5-flash"]
    )
    assert pricing.find_price("gpt-4o", gemini_pricing.PRICES) is None
    promo = pricing.find_price("gemini-3.8-flash", gemini_pricing.PRICES, on=dt.date(2026, 12, 31))
    later = pricing.find_price("gemini-3.8-flash", gemini_pricing.PRICES, on=dt.date(2027, 1, 1))
    assert promo is not None and later is not None and (promo.input, later.input) == (0.75, 1.5)
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"gemini-2.5-flash": {"input": 0.2, "output": 2}, "m-x": {
        "input": 1, "output": 1}}))  # fmt: skip
    table = gemini_pricing.load_prices(str(path))
    assert table["gemini-2.5-flash"].input == 0.2 and "m-x" in table
    assert table["gemini-2.5-pro"] == gemini_pricing.PRICES["gemini-2.5-pro"]
    path.write_text(json.dumps({"m": {"inputs": 1}}))
    with pytest.raises(pricing.PriceError, match="GEMINI_PRICES_FILE"):
        gemini_pricing.load_prices(str(path))


@pytest.mark.parametrize("model", ["gemini-2.5-flash-lite", "gemini-3-pro-preview"])
@pytest.mark.parametrize("media", [None, "low", "medium", "high"])
def test_image_token_rules_agree_with_the_emulators_own(model: str, media: Any) -> None:
    """Two implementations of Google's published rules, written apart, give the same counts."""
    setting = f"MEDIA_RESOLUTION_{media.upper()}" if media else None
    for width, height in [(64, 48), (384, 384), (385, 100), (768, 576), (1000, 3000), (6000, 400)]:
        ours = gemini_pricing.image_tokens(width, height, model, media)
        theirs = gemini_tokens.image_tokens(width, height, model=model, media_resolution=setting)
        assert ours == theirs, (width, height)


# ------------------------------------------------------------------------------ answers
def test_repair_cuts_fences_and_prose_only() -> None:
    body = '{"a": [1, 2]}'
    assert repair(f"```json\n{body}\n```") == body
    assert repair(f"Here you go:\n{body}\nHope it helps!") == body
    assert repair(body) is None
    assert repair('{"a": [1, 2') is None  # cut short: nothing a string operation can fix
    compiled = profiles.load_catalog().profile("moderation")
    answer = {k: "none" for k in compiled.columns[:8]} | {
        "minors_present": False, "flagged": False, "reason": "",
    }  # fmt: skip
    assert parse_answer(f"```\n{json.dumps(answer)}\n```", compiled, "gemini")["flagged"] is False
    with pytest.raises(InvalidOutput, match="does not match profile moderation"):
        parse_answer(json.dumps({**answer, "violence": "extreme"}), compiled, "gemini")


# ------------------------------------------------------------------------------ settings
def test_keys_group_by_project_with_limits() -> None:
    specs, projects = parse_keys(
        ["k1@alpha", "k2@alpha", "k3"], ["alpha:rpm=2000:tpm=0"], QuotaLimits(100, 10**6, 1000)
    )
    assert [s.project for s in specs[:2]] == ["alpha", "alpha"]
    assert specs[2].project == f"key-{specs[2].short}"
    assert projects["alpha"].limits == QuotaLimits(2000, 0, 1000)
    assert projects[specs[2].project].limits == QuotaLimits(100, 10**6, 1000)
    assert "k1" not in repr(specs[0])


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GEMINI_API_KEYS": "AIzaSECRET@bad project"}, "bad project name"),
        ({"GEMINI_API_KEYS": "AIzaSECRET,AIzaSECRET"}, "lists a key twice"),
        ({"GEMINI_API_KEYS": "AIzaSECRET@a", "GEMINI_PROJECT_LIMITS": "b:rpm=1"}, "without keys"),
        ({"GEMINI_API_KEYS": "AIzaSECRET@a", "GEMINI_PROJECT_LIMITS": "a:rpm=x"}, "rpm=N"),
        ({"PROFILES_DIR": "/nonexistent/profiles"}, "not a directory"),
    ],
)
def test_bad_gemini_settings_stop_with_one_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(settings.SettingsError, match=message) as caught:
        load_settings(env)
    assert "SECRET" not in str(caught.value) and "\n" not in str(caught.value)
