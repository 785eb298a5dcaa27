"""Property: whatever bytes, PIL image or array arrives, decoding and then ``Detector.predict``
either score it or raise :class:`stmae.data.DataError` -- nothing else (docs/reliability.md).

Hypothesis drives the generators of ``benchmarks/fuzz.py`` (which runs >= 10,000 seeded
cases and commits its counts); here ~200 examples keep CI short.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from .conftest import load_benchmark

fuzz = load_benchmark("fuzz")
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                    database=None)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    return fuzz.Context(fuzz.tiny_detector(folder / "det"), folder)


@st.composite
def real_files(draw) -> tuple[str, bytes]:
    fmt, mode = draw(st.sampled_from(fuzz.savable()))
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    return fmt, fuzz.real_file(fmt, mode, w, h, draw(st.integers(0, 2**31)), draw(st.integers(0, 63)))


@st.composite
def cases(draw) -> "fuzz.Case":
    kind = draw(st.sampled_from(["bytes", "magic", "valid", "truncated", "corrupted", "lying", "bomb", "pil", "array"]))
    if kind == "bytes":
        return fuzz.Case(kind, "random.png", draw(st.binary(max_size=2048)))
    if kind == "magic":
        return fuzz.Case(kind, "magic.png", draw(st.sampled_from(list(fuzz.MAGIC.values()))) + draw(st.binary(max_size=512)))
    if kind == "bomb":
        return fuzz.Case(kind, "bomb.png", fuzz.png_bomb(draw(st.sampled_from([8001, 20000, 2**31 - 1])), 8001))
    if kind == "pil":
        mode = draw(st.sampled_from(Image.MODES))
        img = fuzz.random_image(np.random.default_rng(draw(st.integers(0, 2**31))), mode,
                                draw(st.sampled_from([1, 2, 17, 64])), draw(st.sampled_from([1, 3, 64, 2000])))
        return fuzz.Case(kind, f"<PIL {mode}>", img)
    if kind == "array":
        return fuzz.Case(kind, "<array>", fuzz.odd_array(np.random.default_rng(draw(st.integers(0, 2**31)))))
    fmt, data = draw(real_files())
    if kind == "truncated":
        data = fuzz.truncate(data, draw(st.integers(0, len(data))))
    elif kind == "corrupted":
        edits = draw(st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=8))
        data = fuzz.corrupt(data, [(p % 64 if i % 2 else p, v) for i, (p, v) in enumerate(edits)])
    elif kind == "lying":
        side = st.sampled_from(fuzz.SPECIAL_SIDES) | st.integers(0, 2000)
        data = fuzz.lie_about_size(fmt, data, draw(side), draw(side))
    return fuzz.Case(kind, f"{kind}.{fmt.lower()}", data)


@pytest.mark.slow
@SETTINGS
@given(case=cases())
def test_decoding_and_predict_raise_only_data_error(ctx, case):
    outcomes = fuzz.check(case, ctx)
    assert outcomes, case.kind
    crashes = [o for o in outcomes if o.status == "crash"]
    assert not crashes, (case.kind, case.name, crashes)


def test_the_known_bad_inputs_are_refused_and_good_ones_scored(ctx):
    """The generators make what they claim: refusals for bad inputs, scores for valid files."""
    png = fuzz.real_file("PNG", "RGB", 20, 10, seed=0)
    expect = {
        "valid": (png, "scored"),
        "truncated": (fuzz.truncate(png, 40), "refused"),
        "bomb": (fuzz.png_bomb(20000, 20000), "refused"),
        "lying": (fuzz.lie_about_size("PNG", png, 2000, 2000), "refused"),
        "empty": (b"", "refused"),
    }
    for name, (data, status) in expect.items():
        outcomes = fuzz.check(fuzz.Case(name, f"{name}.png", data), ctx)
        assert [o.target for o in outcomes] == ["decode_image_bytes", "read_image", "serve /predict"]
        assert {o.status for o in outcomes} == {status}, (name, outcomes)
