"""Notebook 03's comparison with published models: this run's figures computed as the published ones are."""
from helpers.scoring.evaluation import PUBLISHED, comparison_rows


def test_this_runs_row_averages_popes_three_splits_and_takes_mmstars_headline():
    """Catches: POPE's "overall" row averaged in with the splits (published F1 is the mean of random, popular and
    adversarial), fractions shown as percentages or the other way round, a missing blind row."""
    metrics = {"pope": {"overall": {"f1": 0.10}, "random": {"f1": 0.90}, "popular": {"f1": 0.80},
                        "adversarial": {"f1": 0.70}},
               "mmstar": {"headline_accuracy": 0.301, "accuracy": 0.99},
               "pope_blind": {"overall": {"f1": 0.6}, "random": {"f1": 0.6}, "popular": {"f1": 0.6},
                              "adversarial": {"f1": 0.6}}}
    rows = {r["model"]: r for r in comparison_rows(metrics)}
    assert rows["this run"]["POPE F1 (%)"] == "80.0" and rows["this run"]["MMStar (%)"] == "30.1"
    assert rows["this run, blind (blank images)"]["POPE F1 (%)"] == "60.0"
    assert [p["model"] for p in PUBLISHED] == [r["model"] for r in comparison_rows(metrics)[:len(PUBLISHED)]]
    assert "this run, blind (blank images)" not in {r["model"] for r in comparison_rows({"pope": metrics["pope"]})}
