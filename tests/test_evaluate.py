"""Evaluation scoring: votes, turn-wise accuracy, flips and the ten-setting report."""

import pytest

from malt_ops.data import make_problem
from malt_ops.evaluation import chain_records, score_question, verifier_correct
from malt_ops.grading import grade_many
from malt_ops.metrics import mean_std
from malt_ops.stages.evaluate import SETTINGS, build_report, format_table

GSM8K = make_problem("gsm8k", "q", "How many?", "2")


def node(node_id, role, parent, answer, correct, tokens=10, fallback=False):
    return {
        "id": node_id,
        "role": role,
        "parent": parent,
        "answer": answer,
        "correct": correct,
        "fallback": fallback,
        "completion_tokens": tokens,
    }


def tree(outcomes):
    """outcomes: per chain (g_answer, g_ok, v_answer, v_ok, r_answer, r_ok)."""
    nodes = []
    for i, (ga, gc, va, vc, ra, rc) in enumerate(outcomes):
        nodes += [
            node(f"g{i}", "generator", None, ga, gc),
            node(f"g{i}.v0", "verifier", f"g{i}", va, vc),
            node(f"g{i}.v0.r0", "refiner", f"g{i}.v0", ra, rc),
        ]
    return {"problem": GSM8K, "nodes": nodes}


def test_mean_std():
    mean, std = mean_std([0.5, 1.0])
    assert mean == 0.75 and abs(std - 0.3535533905932738) < 1e-12
    assert mean_std([0.4]) == (0.4, 0.0)


def test_score_question_votes_turns_and_flips():
    chains = chain_records(
        tree(
            [
                ("1", False, "2", True, "2", True),  # wrong -> right
                ("2", True, "2", True, "1", False),  # right -> wrong
                ("1", False, "1", False, "2", True),  # wrong -> right
            ]
        )
    )
    scored = score_question(GSM8K, chains, tie_seed=0)
    assert scored["generator"] is False and scored["generator_mv"] is False  # "1" wins the G vote
    assert scored["refiner"] is True and scored["refiner_mv"] is True  # "2" wins the R vote
    assert scored["turns"] == [1 / 3, 2 / 3, 2 / 3]
    assert scored["wrong_to_right"] == 2 and scored["right_to_wrong"] == 1
    assert scored["tokens"]["generator"] == 10 and scored["tokens"]["refiner_mv"] == 90


def test_report_has_all_ten_settings_and_table():
    good = score_question(GSM8K, chain_records(tree([("2", True, "2", True, "2", True)] * 3)), 0)
    bad = score_question(GSM8K, chain_records(tree([("1", False, "1", False, "1", False)] * 3)), 0)
    results = {
        "base": {0: [bad, bad], 1: [good, bad]},
        "star": {0: [good, bad], 1: [good, bad]},
        "malt": {0: [good, good], 1: [good, good]},
    }
    report = build_report(results, [0, 1], {"untrained": []})
    names = [s["setting"] for s in report["settings"]]
    assert names == [name for name, *_ in SETTINGS] and len(names) == 10
    by_name = {s["setting"]: s for s in report["settings"]}
    assert by_name["SA"]["per_seed"] == [0.0, 0.5]
    assert by_name["MALT"]["mean"] == 1.0 and by_name["MALT"]["std"] == 0.0
    assert by_name["STaR MA+MV"]["mean"] == 0.5
    table = format_table(report)
    assert "| MALT | 100.00 ± 0.00 |" in table and "| SA | 25.00 ± 35.36 |" in table
    assert report["turnwise"]["malt"] == [1.0, 1.0, 1.0]


def test_after_verifier_is_the_endorsed_or_stated_answer():
    def chain(g_ok, v_text, v_answer, v_ok):
        return {
            "g": {"answer": "2" if g_ok else "1", "correct": g_ok},
            "v": {"text": v_text, "answer": v_answer, "correct": v_ok},
        }

    # A 'correct' verdict stands for the generator's answer, right or wrong.
    assert verifier_correct(chain(True, "No wrong step.\nVerdict: correct", None, False))
    assert not verifier_correct(chain(False, "No wrong step.\nVerdict: correct", None, False))
    # 'incorrect' without an answer of its own says nothing right; with a corrected one, it counts.
    assert not verifier_correct(chain(True, "Step 1 is wrong.\nVerdict: incorrect", None, False))
    assert verifier_correct(chain(False, "Verdict: incorrect\nFinal answer: 2", "2", True))


def test_copy_rate_counts_refiner_answers_equal_to_their_generator():
    chains = chain_records(
        tree(
            [
                ("17", True, None, False, "17.0", True),  # copied (the same number)
                ("5", False, None, False, "17", True),  # changed
                ("5", False, None, False, None, False),  # no refiner answer: not counted
            ]
        )
    )
    scored = score_question(make_problem("gsm8k", "q17", "How many?", "17"), chains, 0)
    assert scored["copies"] == 1 and scored["refiner_answers"] == 2
    report = build_report(
        {"base": {0: [scored]}, "star": {0: [scored]}, "malt": {0: [scored]}}, [0], {}
    )
    assert report["copying"]["malt"] == {"copies": 1, "refiner_answers": 2, "rate": 0.5}
    assert "| R copies G % |" in format_table(report) and "| 50.0 |" in format_table(report)


def test_vote_is_on_canonical_answers():
    # Issue 16 item 1: "17" and "17.0" were two answers, so 5 / 17 / 17.0 tied and "5" won.
    gold17 = make_problem("gsm8k", "q17", "How many?", "17")
    outcomes = [("5", False, "5", False, "5", False), ("17", True, "17", True, "17", True)]
    outcomes.append(("17.0", True, "17.0", True, "17.0", True))
    for tie_seed in range(20):
        scored = score_question(gold17, chain_records(tree(outcomes)), tie_seed)
        assert scored["generator_mv"] and scored["refiner_mv"]


def test_vote_on_really_graded_reasoning_gym_chains():
    problem = make_problem(
        "reasoning_gym", "r17", "8 + 9 = ?", "17", meta={"task": "basic_arithmetic"}
    )
    texts = ["Final answer: 5", "Final answer: 17", "Final answer: 17.0"]
    grades = grade_many([problem] * 3, texts)
    outcomes = [(g.answer, g.correct) * 3 for g in grades]
    scored = score_question(problem, chain_records(tree(outcomes)), tie_seed=1)
    assert scored["generator_mv"] and scored["refiner_mv"]


def test_chains_without_an_answer_do_not_vote_and_ties_follow_the_seed():
    outcomes = [(None, False) * 3, (None, False) * 3, ("2", True) * 3, ("1", False) * 3]
    results = {
        score_question(GSM8K, chain_records(tree(outcomes)), seed)["generator_mv"]
        for seed in range(40)
    }
    assert results == {True, False}  # a 1-1 tie: either class can win, by the seed
    again = [
        score_question(GSM8K, chain_records(tree(outcomes)), s)["generator_mv"] for s in range(40)
    ]
    assert again == [
        score_question(GSM8K, chain_records(tree(outcomes)), s)["generator_mv"] for s in range(40)
    ]
    blank = score_question(GSM8K, chain_records(tree([(None, False) * 3] * 3)), 0)
    assert blank["generator_mv"] is False and blank["refiner_mv"] is False


def test_report_counts_extraction_fallbacks_per_system():
    chains = chain_records(tree([("2", True, "2", True, "2", True)] * 3))
    chains[0]["g"]["fallback"] = chains[2]["r"]["fallback"] = True
    scored = score_question(GSM8K, chains, 0)
    assert scored["extraction_fallbacks"] == 2
    results = {system: {0: [scored, scored]} for system in ("base", "star", "malt")}
    report = build_report(results, [0], {"untrained": []})
    assert report["extraction_fallbacks"]["malt"] == {"fallbacks": 4, "outputs": 18}


@pytest.mark.model
def test_seed_results_do_not_depend_on_the_other_seeds(hf_backend):
    """seeds: [0] reproduces seed 0 of a seeds: [0, 1] run, question by question."""
    from malt_ops.config import ROLES, Recipe
    from malt_ops.data import make_problem
    from malt_ops.evaluation import run_system

    questions = [
        make_problem("gsm8k", "q1", "Tom has 3 apples and buys 4 more. How many now?", "7"),
        make_problem("gsm8k", "q2", "A box holds 12 pens. How many pens in 2 boxes?", "24"),
        make_problem("gsm8k", "q3", "What is 9 + 10?", "19"),
    ]
    evaluation = {
        "votes": 2,
        "temperature": 1.0,
        "max_new_tokens": dict.fromkeys(ROLES, 10),
    }

    def per_question(seeds: list[int], subsets: dict[int, list]) -> list[dict]:
        recipe = Recipe.model_validate({"evaluation": {**evaluation, "seeds": seeds}})
        return run_system(subsets, hf_backend, dict.fromkeys(ROLES), recipe, "base")[0]

    # Seed 1 repeats question q1 (test subsets overlap across seeds) and adds another.
    both = per_question([0, 1], {0: questions[:2], 1: [questions[0], questions[2]]})
    alone = per_question([0], {0: questions[:2]})
    assert [q["question_id"] for q in alone] == ["q1", "q2"]
    assert both == alone
    # The digest covers every chain's texts, so equal digests mean equal samples.
    assert all(q["samples_sha256"] for q in alone)


AIRFLOW_RUN_IDS = [
    "manual__2026-12-02T00:41:07.532118+00:00",
    "asset_triggered__2026-12-02T00:41:07.532118+00:00",
    "qwen2.5-20261202-004107",
]


@pytest.mark.model
@pytest.mark.parametrize("run_id", AIRFLOW_RUN_IDS)
def test_trained_adapters_load_under_any_run_id(run_id, recipe_file, model_dir, tmp_path):
    """Airflow's run ids (microseconds, ':' and '+') and a dotted recipe name reach PEFT."""
    from peft import LoraConfig, get_peft_model

    from malt_ops.backends.hf import HFBackend
    from malt_ops.config import TRAINED, load_recipe
    from malt_ops.models import load_model
    from malt_ops.stages.common import stage_output
    from malt_ops.stages.evaluate import system_adapters

    recipe = load_recipe(recipe_file())
    adapter = get_peft_model(
        load_model(model_dir), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
    )
    adapter.save_pretrained(tmp_path / "adapter")
    for role in TRAINED:
        trained = stage_output(recipe, run_id, "train", role)
        trained.put_dir(f"adapters/{role}", tmp_path / "adapter")
        trained.commit({})
    backend = HFBackend(model_dir, batch_size=4)
    systems, missing = system_adapters(recipe, run_id, backend)
    assert missing == {"untrained": []}
    names = {systems["malt"][role] for role in ("generator", "verifier", "refiner")}
    assert len(names) == 3 and set(backend.adapters) == names | {systems["star"]["generator"]}
    assert all("." not in name for name in backend.adapters)


# ------------------------------------------------------------------ paired comparisons


def scored(generator, refiner, *, fixed=0, broken=0):
    """One question's score_question record with the given outcomes (every vote alike)."""
    return {
        "generator": generator,
        "generator_mv": generator,
        "refiner": refiner,
        "refiner_mv": refiner,
        "turns": [float(generator), float(generator), float(refiner)],
        "wrong_to_right": fixed,
        "right_to_wrong": broken,
        "chains": 1,
        "tokens": dict.fromkeys(("generator", "generator_mv", "refiner", "refiner_mv"), 1),
    }


def constructed_results() -> dict[str, dict[int, list[dict]]]:
    """Seed 0 draws q1, q2, q3 and seed 1 draws q1 (again) and q4. MALT is right everywhere;
    the base generator (SA) is wrong on q1 under seed 0 only, on q2 and on q4, right on q3."""
    ids = {0: ["q1", "q2", "q3"], 1: ["q1", "q4"]}
    sa = {0: [False, False, True], 1: [True, False]}

    def system(rows):
        return {
            seed: [{"question_id": q, **r} for q, r in zip(ids[seed], rows[seed], strict=True)]
            for seed in ids
        }

    return {
        "base": system({s: [scored(ok, ok) for ok in sa[s]] for s in ids}),
        "star": system({s: [scored(True, True)] * len(ids[s]) for s in ids}),
        "malt": system({s: [scored(ok, True, fixed=int(not ok)) for ok in sa[s]] for s in ids}),
    }


def rows_of(results):
    return [
        {"system": system, "seed": seed, **q}
        for system, by_seed in results.items()
        for seed, questions in by_seed.items()
        for q in questions
    ]


def test_comparisons_on_a_constructed_case():
    from malt_ops.comparisons import compare, correctness, format_comparisons
    from malt_ops.config import Comparison, EvaluationConfig
    from malt_ops.significance import paired_by_question

    results = constructed_results()
    report = build_report(results, [0, 1], {})
    rows = rows_of(results)
    section = compare(report, rows, EvaluationConfig().comparisons)

    by_name = {t["name"]: t for t in section["tests"]}
    assert list(by_name) == [
        "MALT vs SA",
        "MALT vs MA+MV",
        "MALT vs STaR SA+MV",
        "MALT vs STaR MA+MV",
    ]
    sa = by_name["MALT vs SA"]
    # SA: 1/3 under seed 0, 1/2 under seed 1 -> mean 5/12; MALT 1 -> gain (1 - 5/12) / (5/12).
    assert sa["reference_mean"] == pytest.approx(5 / 12) and sa["relative_gain"] == pytest.approx(
        1.4
    )
    # Per question MALT - SA: q1 1/2 (the seeds averaged), q2 1, q3 0, q4 1. Three nonzero
    # differences, all positive: 1 of the 2^3 sign patterns reaches the observed sum.
    assert sa["test"] == {
        "questions": 4,
        "repeated_questions": 1,
        "items": 5,
        "wins": 3,
        "losses": 0,
        "challenger_accuracy": 1.0,
        "reference_accuracy": pytest.approx(0.375),
        "effect": pytest.approx(0.625),
        "p_value": pytest.approx(1 / 8),
    }
    assert sa["met"]  # +140% >= +7%, and no p-value target by default
    direct = paired_by_question(correctness(rows, "MALT"), correctness(rows, "SA")).as_dict()
    assert sa["test"] == direct
    # STaR is as good as MALT everywhere: nothing to win, so the target is missed.
    star = by_name["MALT vs STaR MA+MV"]
    assert star["test"]["p_value"] == 1.0 and star["relative_gain"] == 0.0 and not star["met"]
    assert not section["target_met"]
    assert [f["system"] for f in section["flips"]] == ["base", "star", "malt"]
    assert section["flips"][2] == {
        "system": "malt",
        "wrong_to_right": 3,
        "right_to_wrong": 0,
        "chains": 5,
        "net": 3,
        "more_fixed_than_broken": True,
    }

    # A p-value target: 1/8 is not below 0.05, though the gain is large.
    strict = compare(report, rows, [Comparison(reference="SA", min_gain=0.07, alpha=0.05)])
    assert not strict["tests"][0]["met"] and not strict["target_met"]
    assert compare(report, rows, [Comparison(reference="SA", alpha=0.2)])["target_met"]

    text = format_comparisons(section)
    assert text.splitlines()[0].startswith("MALT vs SA: +140.0% relative")
    assert "| MALT vs SA | 0.125 | 4 | 1 | 5 | 3/0 | +62.50 |" in text
    assert "| malt | 3 | 0 | +3 | 5 |" in text


def test_comparisons_refuse_duplicated_items():
    from malt_ops.comparisons import correctness
    from malt_ops.errors import MaltError

    rows = rows_of(constructed_results())
    with pytest.raises(MaltError, match="lists malt seed 0 question q1 twice"):
        correctness([*rows, rows[-1] | {"seed": 0, "question_id": "q1"}], "MALT")


def test_comparisons_in_the_recipe(recipe_file):
    from malt_ops.config import load_recipe
    from malt_ops.errors import MaltError

    default = load_recipe(recipe_file()).evaluation.comparisons
    assert [(c.challenger, c.reference, c.min_gain) for c in default] == [
        ("MALT", "SA", 0.07),
        ("MALT", "MA+MV", 0.0),
        ("MALT", "STaR SA+MV", 0.0),
        ("MALT", "STaR MA+MV", 0.0),
    ]
    mine = load_recipe(
        recipe_file(),
        ["evaluation.comparisons=[{challenger: MALT w/o MV, reference: STaR SA, alpha: 0.05}]"],
    ).evaluation.comparisons
    assert [(c.challenger, c.reference, c.alpha) for c in mine] == [
        ("MALT w/o MV", "STaR SA", 0.05)
    ]
    for bad, message in [
        ("[{reference: SB}]", "'SB' is not a Table 1 setting"),
        ("[{reference: MALT}]", "compares 'MALT' with itself"),
        ("[{reference: SA}, {reference: SA}]", "listed more than once: MALT vs SA"),
    ]:
        with pytest.raises(MaltError, match=message):
            load_recipe(recipe_file(), [f"evaluation.comparisons={bad}"])


@pytest.mark.slow  # a real evaluate of 3 systems with MLflow and S3 (95-514 s on 2 shared cores);
# tests/test_run.py's end-to-end run checks the same outputs hold the comparisons
@pytest.mark.model
def test_evaluate_writes_and_logs_the_comparisons(
    recipe_file, hf_backend, model_dir, mlflow_server, monkeypatch, tmp_path
):
    """A real evaluate (base model, a random LoRA as every trained adapter): report.json and
    table.md hold the comparisons that per_question.jsonl gives through the significance
    module directly, and MLflow has them as metrics."""
    from mlflow import MlflowClient

    from malt_ops.comparisons import correctness, format_comparisons
    from malt_ops.config import TRAINED, load_recipe
    from malt_ops.significance import paired_by_question
    from malt_ops.stages import evaluate, prepare
    from malt_ops.stages.common import stage_output
    from malt_ops.tracking import metric_name
    from tests.conftest import random_lora

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    experiment = f"compare-{tmp_path.name[-12:]}"
    recipe = load_recipe(
        recipe_file(tracking={"experiment": experiment}),
        [
            "data.test_size=3",  # 2 seeds x 2 questions from 3: one question under both seeds
            "evaluation.seeds=[0, 1]",
            "evaluation.subset_size=2",
            "evaluation.votes=2",
            "evaluation.max_new_tokens={generator: 12, verifier: 12, refiner: 12}",
            # one-digit sums, which the small model sometimes gets right in a few tokens
            "data.task_config={min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, "
            "operators: ['+'], allow_negation: false, allow_parentheses: false}",
            "inference.batch_size=16",  # the hf_backend fixture's
        ],
    )
    run_id = "compare-stage"
    prepare.run(recipe, run_id)
    lora = random_lora(model_dir, tmp_path / "lora")
    for trained in TRAINED:
        unit = stage_output(recipe, run_id, "train", trained)
        unit.put_dir(f"adapters/{trained}", lora)
        unit.commit({})

    evaluate.run(recipe, run_id, backend=hf_backend)

    out = stage_output(recipe, run_id, "evaluate")
    report = out.read_json("report.json")
    rows = list(out.iter_jsonl("per_question.jsonl"))
    section = report["comparisons"]
    means = {s["setting"]: s["mean"] for s in report["settings"]}
    assert [t["name"] for t in section["tests"]] == [
        "MALT vs SA",
        "MALT vs MA+MV",
        "MALT vs STaR SA+MV",
        "MALT vs STaR MA+MV",
    ]
    for t in section["tests"]:
        direct = paired_by_question(
            correctness(rows, t["challenger"]), correctness(rows, t["reference"])
        )
        assert t["test"] == pytest.approx(direct.as_dict())
        assert (t["test"]["questions"], t["test"]["repeated_questions"], t["test"]["items"]) == (
            3,
            1,
            4,
        )
        reference = means[t["reference"]]
        if reference > 0:
            assert t["relative_gain"] == pytest.approx((means["MALT"] - reference) / reference)
    flips = {f["system"]: f for f in section["flips"]}
    malt_rows = [r for r in rows if r["system"] == "malt"]
    assert flips["malt"]["wrong_to_right"] == sum(r["wrong_to_right"] for r in malt_rows)
    assert flips["malt"]["right_to_wrong"] == sum(r["right_to_wrong"] for r in malt_rows)
    assert flips["malt"]["chains"] == 2 * 4

    table = out.read_bytes("table.md").decode()
    assert format_comparisons(section) in table
    assert "| MALT vs SA |" in table and "| malt |" in table

    client = MlflowClient(mlflow_server["url"])
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"tags.`malt_ops.run_id` = '{run_id}' and tags.`malt_ops.stage` = 'evaluate'",
    )
    logged = found[0].data.metrics
    for t in section["tests"]:
        prefix = f"{t['challenger']}_vs_{t['reference']}"
        assert logged[metric_name(f"{prefix}.p_value")] == pytest.approx(t["test"]["p_value"])
        assert logged[metric_name(f"{prefix}.effect")] == pytest.approx(t["test"]["effect"])
        assert logged[metric_name(f"{prefix}.questions")] == 3
        if t["relative_gain"] is not None:
            assert logged[metric_name(f"{prefix}.relative_gain")] == pytest.approx(
                t["relative_gain"]
            )
    assert logged["comparisons.target_met"] == float(section["target_met"])
    assert logged["flips.malt.net"] == flips["malt"]["net"]
