"""RefCOCO answers read in each host's box format and scored (Acc@0.5) in the image's own coordinates.

Crafted answers: Qwen2.5-VL's JSON (fenced, bare, one object), bare lists, already normalised boxes, malformed
answers, boxes partly or wholly outside the image; LLaVA's normalised lists exactly as lmms-eval reads them. The
resized size a Qwen box refers to is checked against what the processor really produced (``image_grid_thw``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval")

from conftest import oracle_lm  # noqa: E402
from pmod_bench.tasks import grounding  # noqa: E402
from pmod_bench.tasks.grounding import NormalisedBoxes, ResizedPixelBoxes, first_box, refcoco_process_results  # noqa: E402

# lmms-eval 0.7.3's qwen2_5_vl chat class: qwen_vl_utils' fetch_image defaults, then the processor at 200,704..1,605,632
QWEN = ResizedPixelBoxes(steps=(("qwen_vl_utils", 28, 4 * 28 * 28, 16384 * 28 * 28), ("transformers", 28, 200704, 1605632)))

# a 64 x 48 image (the RefCOCO fixtures' size): 56 x 56 after fetch_image, then 448 x 448 for the processor, so
# x' = 7 x and y' = 28/3 y. Ground truth box (x, y, w, h) = (4, 6, 32, 24): corners (4, 6)-(36, 30)
W, H = 64, 48
GT = [4 / W, 6 / H, 36 / W, 30 / H]


def doc(bbox=GT):
    return {"question_id": "q1", "answer": "the disc on the left", "bbox": list(bbox), "image_width": W, "image_height": H}


@pytest.fixture(autouse=True)
def default_space():
    yield
    grounding.set_box_space(None)


def acc05(records) -> float:
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_acc05

    return refcoco_bbox_rec_acc05(records)


def score(space, answer: str, bbox=GT) -> tuple[list, float, float]:
    """(the normalised box read, Acc@0.5 through lmms-eval's aggregation, unparsed)."""
    grounding.set_box_space(space)
    out = refcoco_process_results(doc(bbox), [answer])
    return out["refcoco_ACC@0.5"]["pred"], acc05([out["refcoco_ACC@0.5"]]), out["unparsed"]


def test_resized_size_is_the_chain_of_resizes():
    assert QWEN.resized_size(64, 48) == (448, 448)  # 56 x 56 first (aspect lost), then up to >= 200,704 px
    assert QWEN.resized_size(640, 480) == (644, 476)  # within bounds: sides rounded to 28 px
    w, h = QWEN.resized_size(4000, 3000)  # above max_pixels: scaled down, sides multiples of 28
    assert w * h <= 1605632 and w % 28 == 0 and h % 28 == 0 and abs(w / h - 4 / 3) < 0.02


@pytest.mark.parametrize("answer", [
    '```json\n[\n\t{"bbox_2d": [28, 56, 252, 280], "label": "the disc on the left"}\n]\n```',  # Qwen's usual form
    '[{"bbox_2d": [28, 56, 252, 280], "label": "disc"}]',  # no fence
    'The disc is here: {"bbox_2d": [28, 56, 252, 280]}',  # one object inside prose
    "[28, 56, 252, 280]",  # a bare list
    "[28.0, 56.0, 252.0, 280.0]",
    '[{"label": "disc"}, {"bbox_2d": [28, 56, 252, 280], "label": "disc"}]',  # the first entry that has a box
    "[252, 280, 28, 56]",  # corners given the other way round: the same box
])
def test_qwen_pixel_boxes_map_back_to_the_image(answer):
    box, acc, unparsed = score(QWEN, answer)
    assert box == pytest.approx(GT) and acc == 1.0 and unparsed == 0.0


def test_qwen_box_reads_pixels_of_the_resized_input_not_the_original():
    # the same numbers as original-image pixels would be the box (4, 6)-(36, 30) * (7, 9.33): far off
    box, acc, _ = score(QWEN, "[4, 6, 36, 30]")
    assert box == pytest.approx([4 / 448, 6 / 448, 36 / 448, 30 / 448]) and acc == 0.0


def test_qwen_normalised_answer_is_taken_as_normalised():
    """RefCOCO's prompt asks for values in [0, 1]: a fractional box within [0, 1] is read as such."""
    box, acc, unparsed = score(QWEN, "[0.0625, 0.125, 0.5625, 0.625]")
    assert box == pytest.approx(GT) and acc == 1.0 and unparsed == 0.0
    box, _, _ = score(QWEN, "[0, 0, 1, 1]")  # integers: pixels (one pixel of 448), not the whole image
    assert box == pytest.approx([0, 0, 1 / 448, 1 / 448])


def test_qwen_boxes_outside_the_image_are_clipped():
    box, acc, unparsed = score(QWEN, '[{"bbox_2d": [-100, -50, 900, 1000]}]')  # over every edge: the whole image
    assert box == pytest.approx([0.0, 0.0, 1.0, 1.0]) and unparsed == 0.0 and acc == 0.0
    whole = [0.0, 0.0, 1.0, 1.0]
    assert score(QWEN, "[-100, -50, 900, 1000]", bbox=whole)[1] == 1.0
    box, acc, unparsed = score(QWEN, "[500, 500, 600, 600]")  # wholly outside the 448 x 448 input: empty, IoU 0
    assert box == pytest.approx([1.0, 1.0, 1.0, 1.0]) and acc == 0.0 and unparsed == 0.0


@pytest.mark.parametrize("answer", [
    "I cannot find it in the image.",
    "[28, 56, 252]",  # three numbers
    '[{"bbox_2d": [28, 56, "x", 280]}]',  # not a number
    '```json\n[{"bbox_2d": [28, 56, 252',  # cut off
    '{"label": "disc"}',  # no box
    "",
])
def test_qwen_malformed_answers_count_as_unparsed(answer):
    box, acc, unparsed = score(QWEN, answer)
    assert box == [0.0, 0.0, 0.0, 0.0] and acc == 0.0 and unparsed == 1.0


def test_llava_boxes_are_read_exactly_as_lmms_eval_reads_them():
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_process_result

    for answer in ("[0.0625, 0.125, 0.5625, 0.625]", "The box is [0.06, 0.13, 0.56, 0.62].", "[28, 56, 252, 280]",
                   '[{"bbox_2d": [28, 56, 252, 280]}]', "no box"):
        grounding.set_box_space(NormalisedBoxes())
        ours = refcoco_process_results(doc(), [answer])
        theirs = refcoco_bbox_rec_process_result(doc(), [answer])
        assert {k: v for k, v in ours.items() if k != "unparsed"} == theirs, answer
    assert score(NormalisedBoxes(), "[0.0625, 0.125, 0.5625, 0.625]")[1:] == (1.0, 0.0)
    assert score(NormalisedBoxes(), "[28, 56, 252, 280]")[1:] == (0.0, 0.0)  # LLaVA's numbers are never pixels
    assert score(NormalisedBoxes(), "no box")[2] == 1.0
    grounding.set_box_space(None)  # the default, for any other lmms-eval model
    assert isinstance(grounding.box_space(), NormalisedBoxes)


def test_first_box_forms():
    assert first_box('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8]}]') == [1, 2, 3, 4]
    assert first_box('{"bbox": [1.5, 2, 3, 4]}') == [1.5, 2, 3, 4]
    assert first_box("[[1, 2, 3, 4], [5, 6, 7, 8]]") == [1, 2, 3, 4]
    assert first_box("x [1, 2] y [3, 4, 5, 6]") == [3, 4, 5, 6]
    assert first_box("[true, 2, 3, 4]") is None and first_box("nothing") is None


def test_qwen_host_box_space_matches_the_processors_grid():
    """The resized size a Qwen box refers to is the size the processor produced: image_grid_thw * patch size."""
    from pmod_bench.model.presets import build_preset
    from pmod_bench.tasks.fixtures import image
    from pmod_bench.tasks.plugin import PMoDLlava

    lm = PMoDLlava.from_loaded(*build_preset("tiny-qwen2.5-vl", pmod=None), name="q", device="cpu")
    space = grounding.box_space()
    assert isinstance(space, ResizedPixelBoxes) and space == QWEN  # set by the plugin, with lmms-eval's bounds
    patch = lm.host.processor.image_processor.patch_size
    for w, h in ((64, 48), (48, 64), (640, 480), (333, 777), (2400, 1800), (900, 60)):
        prompt, images = lm.host.prompt("Where?", [image(1, w, h)], None)
        inputs = lm.host.encode([prompt], [images], "cpu", None, 1)
        _, gh, gw = inputs["image_grid_thw"][0].tolist()
        assert space.resized_size(w, h) == (gw * patch, gh * patch), (w, h)


@pytest.fixture(scope="module")
def grounding_data(tmp_path_factory):
    from conftest import benchmark_data_env

    yield from benchmark_data_env(tmp_path_factory, ["RefCOCO", "RefCOCO+", "RefCOCOg"])


@pytest.mark.slow
def test_qwen_oracle_scores_full_marks_through_lmms_eval(grounding_data, tmp_path):
    """Answers in Qwen's own form (JSON of integer pixels of the resized input) for the true boxes score 100 on
    RefCOCO / + / g through lmms-eval (process_docs, the adapter's process_results, the aggregations)."""
    from pmod_bench.tasks.runner import EvalConfig, run_eval

    def qwen_answer(_task, d, _request):
        rw, rh = QWEN.resized_size(*d["image"].size)
        x1, y1, x2, y2 = d["bbox"]
        box = [round(x1 * rw), round(y1 * rh), round(x2 * rw), round(y2 * rh)]
        return f'```json\n[{{"bbox_2d": {box}, "label": "{d["answer"]}"}}]\n```'

    grounding.set_box_space(QWEN)
    out = run_eval(EvalConfig(model="oracle", suite="grounding", output=str(tmp_path / "g")), lm=oracle_lm(qwen_answer), log=lambda m: None)
    assert out.failures == {}
    assert {r["benchmark"]: (r["value"], r["n_unparsed"]) for r in out.rows} == {
        "RefCOCO": (100.0, 0), "RefCOCO+": (100.0, 0), "RefCOCOg": (100.0, 0)}
    grounding.set_box_space(None)  # the same answers read as LLaVA's (normalised) boxes: all wrong
    out = run_eval(EvalConfig(model="oracle", suite="grounding", output=str(tmp_path / "l")), lm=oracle_lm(qwen_answer), log=lambda m: None)
    assert {r["benchmark"]: r["value"] for r in out.rows} == {"RefCOCO": 0.0, "RefCOCO+": 0.0, "RefCOCOg": 0.0}
