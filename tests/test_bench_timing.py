"""The bench's side-by-side timing: each variant runs first as often as second, and the medians are compared."""

from knexp.bench.timing import alternating


def test_alternating_reverses_the_order_every_other_round_and_takes_medians(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("knexp.bench.timing.time.perf_counter", lambda: now[0])
    order = []
    durations = {"a": iter([1.0, 5.0, 2.0, 9.0]), "b": iter([4.0, 4.0, 6.0, 4.0]), "c": iter([3.0, 1.0, 2.0, 8.0])}

    def variant(name: str):
        def run():
            order.append(name)
            now[0] += next(durations[name])
            return name.upper()
        return run

    median, results = alternating({name: variant(name) for name in "abc"}, 4)
    assert order == ["a", "b", "c", "c", "b", "a"] * 2
    assert results == {"a": "A", "b": "B", "c": "C"}
    assert median == {"a": 3.5, "b": 4.0, "c": 2.5}


def test_only_into_a_new_file_writes_that_one_section(tmp_path, monkeypatch):
    import sys

    import knexp.bench.__main__ as bench

    monkeypatch.setattr(bench, "SECTIONS", {"data": ("## A section", lambda: "## A section\n\nmeasured\n")})
    out = tmp_path / "new.md"
    monkeypatch.setattr(sys, "argv", ["knexp.bench", "--only", "data", "--out", str(out)])
    bench.main()
    text = out.read_text()
    assert text.startswith("## A section\n\nmeasured\n") and "Measured alone (`--only data`)" in text
    bench.main()  # again: the section is replaced, not added
    assert out.read_text().count("## A section") == 1


def test_paired_ratio_takes_the_median_of_each_rounds_ratio(monkeypatch):
    from knexp.bench.timing import paired_ratio

    now = [0.0]
    monkeypatch.setattr("knexp.bench.timing.time.perf_counter", lambda: now[0])
    base, other = iter([1.0, 2.0, 4.0]), iter([1.1, 2.2, 4.4])  # the machine slows down, the ratio stays 1.1

    def run(durations):
        def go():
            now[0] += next(durations)
        return go

    b, o, ratio = paired_ratio(run(base), run(other), 3)
    assert b == 2.0 and abs(o - 2.2) < 1e-9 and abs(ratio - 1.1) < 1e-9


def test_the_hand_written_notes_survive_a_render_and_a_new_section_goes_before_them(tmp_path, monkeypatch):
    import json
    import sys

    import knexp.bench.__main__ as bench

    out, raw = tmp_path / "BENCHMARKS.md", tmp_path / "bench.json"
    hand = f"{bench.HAND_HEADING}\n\n### A note\n\nmeasured by hand\n"
    out.write_text("# Benchmarks\n\n## Old section\n\nold numbers\n\n" + hand)
    raw.write_text(json.dumps({}))
    monkeypatch.setattr(bench, "render", lambda result: "# Benchmarks\n\n## Rendered\n\nnew numbers\n\n")
    monkeypatch.setattr(sys, "argv", ["knexp.bench", "--render", "--out", str(out), "--json", str(raw)])
    bench.main()
    # the old numbers gone, the notes kept
    assert out.read_text() == "# Benchmarks\n\n## Rendered\n\nnew numbers\n\n" + hand
    monkeypatch.setattr(bench, "SECTIONS", {"data": ("## Added", lambda: "## Added\n\nmeasured\n")})
    monkeypatch.setattr(sys, "argv", ["knexp.bench", "--only", "data", "--out", str(out)])
    bench.main()
    text = out.read_text()
    assert text.index("## Added") < text.index(bench.HAND_HEADING) and text.endswith(hand)
    bench.main()  # replacing the section keeps the notes too
    assert out.read_text().count("## Added") == 1 and out.read_text().endswith(hand)
