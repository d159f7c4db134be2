"""The `compare` entry point: a side-by-side table and val_acc curves of training runs.

Reads:  finished training runs (tag step = 'train') of every experiment, or of one, or named by run id, or the top
        N by a column of the table; their params, metric histories and the test metrics that evaluate logged on each
        run's model (train runs carry the model's URI in tag `model_uri`). Runs not finished, runs of another project
        (none of this pipeline's params) and runs that logged no params are left out, counted in lines above the
        table, and refused by id.
Writes: a comparison run (tag step = 'compare') with artifacts `runs.md`, `runs.csv` (one row per
        run: `experiment` where the runs are of several, the params (and the PROVENANCE_TAGS: `train_code`,
        `backend`, `dtype_policy`, `jit_compile`,
        `replicas`, `hardware`; `effective_lr` where train.lr_scaling made the lr trained at another) that differ
        between the runs (not params whose values differ only in runs where they have no effect given the others,
        tag `inert_params`: a line above the table names them; a cell `(inert)` where a param shown has none in its
        run), `data` where the datasets they trained on differ (the digest of each), epochs, final and
        best `val_acc`,
        `val_data` where the runs' validation images differ or one validated on the test split,
        `val_images_in_train` where a val_acc counts images its run trained on,
        `test_acc` on the dataset it trained on, `test_data` where the runs' test splits differ,
        `test_images_in_train` where a test_acc counts images its model trained on, `wall_s` (the seconds train
        spent on the run over all its sessions: metric `wall_seconds`; `wall_s_from` marks an older run's that is
        its end time less its start time), images/s),
        `val_acc.png` (val_acc per epoch, one curve per run, the best LEGEND_RUNS named) and
        `compared_runs.txt` (the run ids, one a line; also tag `compared_runs` where they fit a tag); the Markdown
        table is also the run's description (the rows that fit MLflow's 8,000-character tag, then how many more
        runs.md holds) and is printed.
Returns a dict: the comparison run id, the table (a DataFrame) and the artifact paths.
Searching the runs and recording the comparison: `pipeline.tracking.steps`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import matplotlib
import pandas as pd

from pipeline import config
from pipeline.tracking import (
    DATASET_SHA256,
    INERT_PARAMS_TAG,
    VAL_DATA_TAG,
    cli,
    given_param,
    json_digest,
    markdown_table,
    metric_history,
    model_score,
    open_run,
    steps,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the headless backend
from matplotlib.ticker import MaxNLocator  # noqa: E402

CURVE_METRIC = "val_acc"
# Columns every table has, after the differing params; `--metric` picks one of the numeric ones.
RESULT_COLUMNS = ("epochs", "val_acc", "best_val_acc", "test_acc", "wall_s", "images_per_s")
# Params that identify rather than configure a run; they differ between runs without meaning anything: the
# dataset URI, the train entry point's own parameters, which `mlflow run . -e train` logs on the run as given
# (`''` where left out), beside the dotted params they resolve to, and tracking.experiment, which is not even where
# the run went under `mlflow run --experiment-name` (column `experiment` is: the run's experiment's name).
IGNORED_PARAMS = ("dataset_uri", "tracking.experiment",
                  *config.read_yaml(config.MLPROJECT, key="MLproject")["entry_points"]["train"]["parameters"])
# Tags naming what trained a run besides its params: a column where they differ between the runs, as the same params
# under other code are another experiment (`train_code`: the digest of the training code, shortened), and so are they
# on another backend, precision, XLA choice or number of replicas (what `train.precision: auto` and
# `train.jit_compile: auto` resolved to on the run's machine: a GPU's bfloat16 run and a CPU's float32 run of the same
# params showed as two rows with no column telling them apart).
# `hardware` too: what the run's wall_s and images/s were timed on (a faster machine is no faster params).
PROVENANCE_TAGS = ("train_code", "backend", "dtype_policy", "jit_compile", "replicas", "hardware")
DIGEST_TAGS = ("train_code",)  # shortened to 12 hex digits in the table
# Columns where lower is better (so sorted lowest first), besides any `*_loss` and `*_images_in_train` (a score that
# counts images the model trained on is the less to be trusted the more it counts); the others sort highest first.
LOWER_IS_BETTER = ("wall_s", "loss")
DECIMALS = {"wall_s": 1, "images_per_s": 0}  # in runs.md and on the console (runs.csv keeps every digit)
# val_acc.png names the best LEGEND_RUNS runs (distinct colour and line style each: at most 20); more draw grey.
LEGEND_RUNS = 20
# A run name longer than this is cut in the legend (its short id stays), so the legend leaves room for the plot.
LABEL_CHARS = 40


def lower_is_better(metric: str) -> bool:
    """Whether the best runs by `metric` have its lowest values: wall time, losses, images trained on counted."""
    return metric in LOWER_IS_BETTER or metric.endswith(("_loss", "_images_in_train"))


def val_acc_history(run_id: str) -> pd.Series:
    """The run's val_acc per epoch (index: step = epoch)."""
    return metric_history(run_id, CURVE_METRIC)


def differing_params(runs: pd.DataFrame) -> list[str]:
    """`params.*` columns whose values are not the same in every run (missing counts as a value), sorted, so that
    every comparison of the same runs has its columns in the same order."""
    columns = sorted(c for c in runs.columns
                     if c.startswith("params.") and c.removeprefix("params.") not in IGNORED_PARAMS)
    return [c for c in columns if runs[c].astype("string").fillna("<unset>").nunique() > 1]


# The cell of a param without effect in its run (`config.inert_params`), in a column kept for the runs it has effect in
INERT = "(inert)"


def inert_keys(run: pd.Series) -> set[str]:
    """The params without effect given the others in a training run (a row of `search_train_runs`): its tag
    INERT_PARAMS_TAG's keys, or for a run from before that tag, `config.inert_params` of its logged params (none
    where they do not load: keys or values since refused)."""
    tag = run.get(f"tags.{INERT_PARAMS_TAG}")
    if isinstance(tag, str) and tag:
        try:
            listed = json.loads(tag)
        except ValueError:  # edited by hand
            return set()
        return set(listed) if isinstance(listed, dict) else set()
    params = {c.removeprefix("params."): v for c, v in run.items() if c.startswith("params.") and isinstance(v, str)}
    try:
        return set(config.inert_params(config.from_run_params(params)))
    except config.ConfigError:
        return set()


def params_without_effect(runs: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """(the `differing_params` whose values differ only in runs where they have no effect, which no table shows,
    and a mask of `runs`' cells holding a value of a param without effect in its run, `inert_keys`). Left out where
    every run the param has effect in holds one value: giving the others that value too would train every run as
    before, and no column would show."""
    keys = pd.Series([inert_keys(run) for _, run in runs.iterrows()], index=runs.index, dtype=object)
    mask = pd.DataFrame(False, index=runs.index, columns=runs.columns)
    left_out = []
    for column in differing_params(runs):
        key = column.removeprefix("params.")
        mask[column] = runs[column].notna() & keys.map(lambda inert, key=key: key in inert).astype(bool)
        if runs[column][~mask[column]].astype("string").fillna("<unset>").nunique() <= 1:
            left_out.append(column)
    return left_out, mask


def inert_note(runs: pd.DataFrame, table: pd.DataFrame) -> str:
    """A line before the table naming the params left out as differing only where they have no effect, and saying
    what a cell INERT is where `table` has one; else ''."""
    left_out = [c.removeprefix("params.") for c in params_without_effect(runs)[0]]
    parts = [f"Left out: {', '.join(left_out)}, whose values differ only in runs where they have no effect given "
             "their other params"] if left_out else []
    if (table.astype(object) == INERT).any().any():
        parts.append(f"a cell `{INERT}` is a param without effect in its run")
    if not parts:
        return ""
    note = "; ".join(parts)
    return f"{note[0].upper()}{note[1:]} (tag {INERT_PARAMS_TAG} of each run says why).\n\n"


def trained_on(run: pd.Series) -> str:
    """The dataset URI a training run (a row of `search_train_runs`) trained on, as `trained_dataset_uri` reads it;
    "" if it names none."""
    tag, param = run.get("tags.dataset_uri"), run.get("params.dataset_uri")
    return tag if isinstance(tag, str) and tag else given_param(param) if isinstance(param, str) else ""


# val_data of a run validated on the test split (train.validation_fraction 0) starts so: its val_acc is a test score.
ON_TEST = "test split "
# val_data of a run from before VAL_DATA_TAG, not validated on the test split: a digest of what chose its images.
FROM_PARAMS = "params:"


def val_data(run: pd.Series, test_data: str | None) -> str | None:
    """What a training run's val_acc was measured on: the first 12 hex digits of tag `val_data_sha256`, or of the
    evaluated test split (`test_data`) of an older run validated on it, else FROM_PARAMS and a digest of the dataset
    URI, train.validation_fraction and train.seed (which choose the held-out images); ON_TEST first for a run
    validated on the test split. None if the run logged no train.validation_fraction."""
    fraction, tag = run.get("params.train.validation_fraction"), run.get(f"tags.{VAL_DATA_TAG}")
    try:
        on_test = float(fraction) == 0
    except (TypeError, ValueError):
        return tag[:12] if isinstance(tag, str) and tag else None
    if isinstance(tag, str) and tag:
        digest = tag[:12]
    elif on_test and test_data:  # the same digest a newer run tags: its validation images are that test split
        digest = test_data[:12]
    else:
        chosen_by = [trained_on(run), "test" if on_test else fraction, run.get("params.train.seed")]
        digest = FROM_PARAMS + json_digest(chosen_by)[:12]
    return ON_TEST + digest if on_test else digest


# wall_s_from of a run logged before metric `wall_seconds`: its wall_s is its end time less its start time.
SPAN = "end - start"


def wall_seconds(run: pd.Series) -> tuple[float, bool]:
    """A training run's wall_s and whether it is its calendar span: the seconds train spent on it, summed over its
    sessions (metric `wall_seconds`, `pipeline.tracking.training.SessionClock`: no time between an interruption and
    its resume counts), else, for a run logged before that metric, its end time less its start time (True), which a
    resumed run's first start stretches over every gap. NaN for a run not ended (still training, or left RUNNING by
    a kill)."""
    if pd.isna(run.get("end_time")):
        return math.nan, False
    logged = run.get("metrics.wall_seconds", math.nan)
    if pd.notna(logged):
        return float(logged), False
    return (run["end_time"] - run["start_time"]).total_seconds(), True


# Tag of a train run: train.lr after train.lr_scaling, the peak lr it trained with (`fitting.schedule_tags`).
EFFECTIVE_LR = "effective_lr"


def scaled_lr_differs(runs: pd.DataFrame) -> bool:
    """Whether the runs trained at different lrs (tag EFFECTIVE_LR) where one of them scaled train.lr
    (train.lr_scaling linear): two runs of train.lr 0.1 at batch 128 and 256 trained at 0.1 and 0.2, and the table's
    differing params showed train.batch_size alone; runs that scaled nothing have their lr in column train.lr."""
    if f"tags.{EFFECTIVE_LR}" not in runs:
        return False
    lrs = runs[f"tags.{EFFECTIVE_LR}"]
    given = runs["params.train.lr"] if "params.train.lr" in runs else pd.Series(None, index=runs.index)
    scaled = lrs.notna() & (lrs.astype("string") != given.astype("string"))
    return lrs.dropna().nunique() > 1 and bool(scaled.any())


# Tags of a run resumed by id and what they stand for in the table: a run extended to more epochs (`3 -> 6`: its
# first 3 on the 3-epoch lr schedule) is no run of its new train.epochs, nor one resumed under other code
# (`<old> -> <new> after epoch 2`) a run of its new train_code; the cell says what happened.
RESUMED_AS = {"tags.extended_epochs": "params.train.epochs", "tags.resumed_across_code": "tags.train_code"}


def as_trained(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with each cell RESUMED_AS names replaced, for a run that has the tag, by the tag's value."""
    runs = runs.copy()
    for tag, column in RESUMED_AS.items():
        if tag in runs:
            resumed = (runs[tag].astype("string").fillna("") != "").astype(bool)
            if resumed.any():
                if column not in runs:  # a run from before that param or tag
                    runs[column] = None
                runs[column] = runs[column].astype(object).where(~resumed, runs[tag])
    return runs


def build_table(runs: pd.DataFrame, histories: dict[str, pd.Series]) -> pd.DataFrame:
    """One row per run: name, run id, the differing params (without the `params.` prefix; but those that differ only
    where they have no effect, and a cell INERT where the param has none in its run: `params_without_effect`) and
    PROVENANCE_TAGS, RESULT_COLUMNS (with `val_data` after best_val_acc where the validation images differ or a run
    validated on the test split, `val_images_in_train` after those where a val_acc counts images its run trained on,
    `test_data` after test_acc where the test splits differ, `test_images_in_train` where a test_acc counts images
    its model was trained on, `wall_s_from` after wall_s where a run's wall_s is its end - start: `wall_seconds`)."""
    rows, scores = [], {}
    left_out, inert = params_without_effect(runs)  # of the params as logged, before `as_trained`
    runs = as_trained(runs)
    varying = [c for c in differing_params(runs) if c not in left_out]
    provenance = [t for t in PROVENANCE_TAGS if f"tags.{t}" in runs and runs[f"tags.{t}"].dropna().nunique() > 1]
    if scaled_lr_differs(runs):  # beside train.lr, which is not the lr trained with under train.lr_scaling linear
        provenance.append(EFFECTIVE_LR)
    for index, run in runs.iterrows():
        history = histories[run["run_id"]]
        # on the data it trained on: a later evaluation on other test images (a data.max_test subset, another
        # copy) scores what the other rows' do not, and ranked first a model worse on the whole split
        # by what the data is: the evaluation may spell the dataset's path otherwise (`./d.npz`, a file:// URI)
        metrics, test_data = model_score(run.get("tags.model_uri"), trained_on(run), run.get(f"tags.{DATASET_SHA256}"))
        scores[run["run_id"]] = metrics
        wall, span = wall_seconds(run)
        rows.append({
            "run": run.get("tags.mlflow.runName"), "run_id": run["run_id"],
            **{c.removeprefix("params."): INERT if c in inert and inert.at[index, c] else run[c]
               for c in varying},
            **{t: (tag[:12] if t in DIGEST_TAGS and " -> " not in tag else tag)
               if isinstance(tag := run[f"tags.{t}"], str) else None for t in provenance},
            "data": run.get("data_digest"),
            "epochs": len(history),
            "val_acc": history.iloc[-1] if len(history) else math.nan,
            "best_val_acc": history.max() if len(history) else math.nan,
            "val_data": val_data(run, test_data),
            "val_images_in_train": run.get("metrics.val_images_in_train", math.nan),  # NaN: a run from before it
            "test_acc": metrics.get("test_acc", math.nan),
            "wall_s": wall,
            "wall_s_from": span,
            # The last epoch's throughput: the first one also pays for tracing and compilation.
            "images_per_s": run.get("metrics.images_per_second", math.nan),
            "test_data": test_data,
            "test_images_in_train": metrics.get("test_images_in_train", math.nan),
        })
    table = pd.DataFrame(rows)
    table.attrs[SCORED_NAN] = frozenset(row["run_id"] for row in rows if "test_acc" in scores[row["run_id"]]
                                        and math.isnan(scores[row["run_id"]]["test_acc"]))
    if "experiment_name" in runs and runs["experiment_name"].nunique() > 1:  # runs of several experiments: which
        table.insert(table.columns.get_loc("run_id") + 1, "experiment", runs["experiment_name"].to_numpy())
    if table["data"].dropna().nunique() <= 1:  # trained on other data (the same data params, an edited image folder)
        table = table.drop(columns="data")
    else:
        table["data"] = table["data"].str[:12]
    spans = table.pop("wall_s_from")
    if spans.any():  # an older run's wall_s is its calendar span: marked beside it
        table.insert(table.columns.get_loc("wall_s") + 1, "wall_s_from", spans.map({True: SPAN, False: ""}))
    sets = table["val_data"].dropna()
    if sets.nunique() > 1 or sets.str.startswith(ON_TEST).any():  # val_accs of other images, or test scores
        table.insert(table.columns.get_loc("best_val_acc") + 1, "val_data", table.pop("val_data"))
    else:
        table = table.drop(columns="val_data")
    held_out = table.pop("val_images_in_train")
    if (held_out > 0).any():  # a val_acc partly on images trained on overstates: shown beside it
        after = "val_data" if "val_data" in table else "best_val_acc"
        table.insert(table.columns.get_loc(after) + 1, "val_images_in_train", held_out.astype("Int64"))
    in_train = table.pop("test_images_in_train")
    if (in_train > 0).any():  # a test_acc partly on training images overstates: shown beside it
        table.insert(table.columns.get_loc("test_acc") + 1, "test_images_in_train", in_train.astype("Int64"))
    if table["test_data"].dropna().nunique() > 1:  # test_acc on other test images (another copy, a subset) says so
        table.insert(table.columns.get_loc("test_acc") + 1, "test_data", table.pop("test_data").str[:12])
    else:
        table = table.drop(columns="test_data")
    return table


def rows_counting(table: pd.DataFrame, column: str) -> int:
    """How many rows of `table` count images their score should not (`column` > 0: test_images_in_train,
    val_images_in_train); 0 where the column is absent (`build_table` drops it where every count is 0)."""
    return int((table[column] > 0).sum()) if column in table else 0


def test_data_note(table: pd.DataFrame) -> str:
    """A line before the table where its test_acc values come from different test splits, one where some count
    test images their model was trained on; else ''."""
    splits = table["test_data"].dropna().nunique() if "test_data" in table else 0
    note = (f"test_acc was measured on {splits} different test splits (column test_data: the sha256 of the test split "
            "each test_acc was measured on): only rows with the same test_data compare.\n\n" if splits > 1 else "")
    if leaked := rows_counting(table, "test_images_in_train"):
        note += (f"The test_acc of {leaked} run{'s' * (leaked > 1)} counts test images the model was trained on "
                 "(column test_images_in_train: the same pixels): it overstates, and register moves no alias on "
                 "it.\n\n")
    return note


def left_out_note(unfinished: dict[str, int], other_project: int = 0, no_params: int = 0) -> str:
    """Lines before the table naming the training runs left out as not finished, by status, and counting those of
    another project (`steps.of_another_project`) and those without params (`steps.NO_PARAMS`); else ''."""
    note = (f"Left out: {other_project} training run{'s' * (other_project > 1)} of another project (tag step=train, "
            "but none of this pipeline's params).\n\n" if other_project else "")
    if no_params:
        note += (f"Left out: {no_params} training run{'s' * (no_params > 1)} without params (tag step=train, but "
                 f"{steps.NO_PARAMS}).\n\n")
    if not unfinished:
        return note
    total = sum(unfinished.values())
    statuses = steps.unfinished_counts(unfinished)
    return note + (f"Left out: {total} training run{'s' * (total > 1)} not finished ({statuses}: still training, or "
                   "stopped before the end): only finished runs compare.\n\n")


def wall_note(table: pd.DataFrame) -> str:
    """A line before the table where some rows' wall_s is their calendar span (runs logged before metric
    `wall_seconds`), else ''."""
    spans = int((table["wall_s_from"] == SPAN).sum()) if "wall_s_from" in table else 0
    if not spans:
        return ""
    return (f"The wall_s of {spans} run{'s' * (spans > 1)} (column wall_s_from: `{SPAN}`), logged before train "
            "recorded the seconds it spent, is its end time less its start time: for a run interrupted and resumed "
            "or extended later, that counts the time between its sessions too, and it compares with no other "
            "row's.\n\n")


def data_note(table: pd.DataFrame) -> str:
    """A line before the table where its runs trained on different data, else ''."""
    sets = table["data"].dropna().nunique() if "data" in table else 0
    if sets < 2:
        return ""
    return (f"The runs trained on {sets} different datasets (column data: the digest of the prepared dataset each "
            "trained on, as its Dataset column in the MLflow UI shows it): rows with other data differ by more than "
            "their params.\n\n")


def val_data_note(table: pd.DataFrame) -> str:
    """Lines before the table where its val_acc values come from different validation images, are test scores
    (a run validated on the test split), or count images their run trained on, else ''."""
    sets = table["val_data"].dropna() if "val_data" in table else pd.Series(dtype=str)
    on_test = int(sets.str.startswith(ON_TEST).sum())
    older = (f"; `{FROM_PARAMS}` for a run from before that was recorded: a digest of its dataset, "
             "train.validation_fraction and train.seed" if sets.str.contains(FROM_PARAMS).any() else "")
    note = (f"val_acc and best_val_acc were measured on {sets.nunique()} different validation sets (column val_data: "
            f"the sha256 of each run's validation images{older}): only rows with the same val_data compare.\n\n"
            if sets.nunique() > 1 else "")
    if on_test:
        note += (f"The rows whose val_data starts `{ON_TEST.strip()}` ({on_test}) validated on the test split "
                 "(train.validation_fraction 0): their val_acc is a test score, a run chosen by it is chosen on the "
                 "test images, and its test_acc is then no unbiased estimate. Hold training images out "
                 "(train.validation_fraction > 0) to choose.\n\n")
    if seen := rows_counting(table, "val_images_in_train"):
        note += (f"The val_acc of {seen} run{'s' * (seen > 1)} counts images it was measured on that are also images "
                 "its model trained on (column val_images_in_train: the same pixels): it overstates, and runs chosen "
                 "by it are chosen partly on images they learned.\n\n")
    return note


# Columns `build_table` leaves out where every run's count is 0: sorted by, the runs are equals, in the table's order.
COUNT_COLUMNS = ("val_images_in_train", "test_images_in_train")
# The numeric columns a table may have: what `metric` may name, checked before any run is read
SORT_COLUMNS = RESULT_COLUMNS + COUNT_COLUMNS


def top_runs(table: pd.DataFrame, metric: str, top: int | None) -> pd.DataFrame:
    """Rows sorted by `metric`, best first (lowest first for times and losses, else highest; equals in the
    table's order), runs without it last; the first `top` if given."""
    if metric in COUNT_COLUMNS and metric not in table.columns:  # no run counts any: all equal, 0
        table = table.assign(**{metric: 0})
        return top_runs(table, metric, top).drop(columns=metric)
    if metric not in table.columns or not pd.api.types.is_numeric_dtype(table[metric]):
        raise config.ConfigError(f"metric: must be one of {', '.join(SORT_COLUMNS)}, got {metric!r}")
    ordered = table.sort_values(metric, ascending=lower_is_better(metric), na_position="last",
                                kind="stable").reset_index(drop=True)
    return ordered.head(top) if top else ordered


def unranked_note(table: pd.DataFrame, metric: str) -> str:
    """A line before the table where some of its runs (all of them, before `top` keeps the first) have no `metric`
    (never evaluated: no test_acc; logged before a metric was): `top_runs` lists them last, in no order by it; else
    ''. Their empty cells alone did not say the top rows were no best where none had one."""
    if metric not in table:  # a count no run has: every run's is 0
        return ""
    missing = int(table[metric].isna().sum())
    if not missing:
        return ""
    nan = int(logged_nan(table, metric).sum())
    logged = f"; {nan} logged it as NaN, its training diverged" if nan else ""
    return (f"No {metric} for {missing} run{'s' * (missing > 1)} (of {len(table)}{logged}): they are listed last, in "
            "no order by it.\n\n")


# The table's columns of a value each run logged per epoch: NaN where a run logged NaN (a diverged run), or none
HISTORY_COLUMNS = ("val_acc", "best_val_acc")
NAN = "NaN"  # the cell (runs.md, runs.csv) of a value logged as NaN; an empty cell is a run that logged none
SCORED_NAN = "test_acc_logged_nan"  # the table's attrs: run ids whose model's evaluation logged test_acc NaN


def logged_nan(table: pd.DataFrame, column: str) -> pd.Series:
    """Which rows of `table` hold NaN in `column` as their run logged it: a val_acc or best_val_acc (HISTORY_COLUMNS)
    of a run with epochs of val_acc, a test_acc its model's evaluation logged NaN (`build_table`'s attrs
    SCORED_NAN; a run never evaluated has none): an empty cell said nothing of a diverged run's; False for any other
    column."""
    if column == "test_acc" and column in table:
        return table["run_id"].isin(table.attrs.get(SCORED_NAN, frozenset())) & table[column].isna()
    if column not in HISTORY_COLUMNS:
        return pd.Series(False, index=table.index)
    return (table["epochs"] > 0) & table[column].isna()


def nan_shown(table: pd.DataFrame) -> pd.DataFrame:
    """`table` for runs.md, runs.csv and the console: a val_acc, best_val_acc or test_acc logged as NaN written NAN
    (pandas writes NaN in a CSV as an empty cell, which is a run that logged none)."""
    table = table.copy()
    for column in (*HISTORY_COLUMNS, "test_acc"):
        nan = logged_nan(table, column)
        if nan.any():
            table[column] = table[column].astype(object).where(~nan, NAN)
    return table


def curve_label(row) -> str:
    """A run's legend entry: its name (cut to LABEL_CHARS) and short id, '$' kept literal (matplotlib reads text
    between two as math: a name like 'lr $\\alpha$' failed the comparison, others rendered mangled); a run without a
    name (its cell in the table empty) by its short id alone, not as 'nan' or 'None'; its val_data where the table
    has that column (curves of other validation images, or of the test split, drawn alike read as comparable)."""
    notes = [row.run_id[:7]] + ([] if row.epochs else ["no val_acc"])
    if isinstance(held_out := getattr(row, "val_data", None), str):
        notes.append(f"val_data {held_out}")
    if not isinstance(row.run, str) or not row.run:
        return notes[0] + "".join(f" ({note})" for note in notes[1:])
    name = row.run if len(row.run) <= LABEL_CHARS else row.run[:LABEL_CHARS - 1] + "…"
    return f"{name} ({', '.join(notes)})".replace("$", r"\$")


def curves_figure(table: pd.DataFrame, histories: dict[str, pd.Series], metric: str) -> plt.Figure:
    """val_acc against epoch, one line per row of `table` (best first by `metric`): the first LEGEND_RUNS in
    distinct colour and line style, named in a legend beside the axes, the others thin and grey beneath them.
    Fifty runs in one legend inside the axes covered the curves and ran off the picture."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    named, rest = table.head(LEGEND_RUNS), table.iloc[LEGEND_RUNS:]
    handles, labels = [], []
    for row in rest.itertuples(index=False):
        history = histories[row.run_id]
        # dots too: a run of one epoch draws no line
        ax.plot(history.index, history.to_numpy(), color="0.6", linewidth=0.8, alpha=0.6, marker="o", markersize=1.5)
    if len(rest):
        handles.append(ax.lines[-1])
        labels.append(f"{len(rest)} more runs, ranked below by {metric} (runs.md)")
    colors = plt.get_cmap("tab10").colors
    for i, row in enumerate(named.itertuples(index=False)):
        history = histories[row.run_id]
        # 10 colours, then the same with dashes and squares: no two named curves look alike
        (line,) = ax.plot(history.index, history.to_numpy(), color=colors[i % 10], linestyle=("-", "--")[i // 10],
                          marker=("o", "s")[i // 10], markersize=3, zorder=3)
        handles.insert(i, line)
        labels.insert(i, curve_label(row))  # explicit: matplotlib leaves out a label starting with '_'
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel(CURVE_METRIC)
    sets = table["val_data"].nunique() if "val_data" in table else 1
    ax.set_title(f"{CURVE_METRIC} of {len(table)} training runs"
                 + (f", the best {len(named)} by {metric} named" if len(rest) else "")
                 + (f", on {sets} validation sets (val_data)" if sets > 1 else ""))
    ax.grid(alpha=0.3)
    legend = fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    # The axes keep their size: the figure grows by the legend's width (and to its height)
    box = legend.get_window_extent(fig.canvas.get_renderer())
    fig.set_size_inches(7 + box.width / fig.dpi, max(4.5, box.height / fig.dpi + 0.3))
    return fig


def plot_curves(table: pd.DataFrame, histories: dict[str, pd.Series], path: Path, metric: str = CURVE_METRIC) -> None:
    """`curves_figure` saved as a PNG at `path`."""
    fig = curves_figure(table, histories, metric)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(experiment: str | None = None, run_ids: list[str] | None = None, top: int | None = None, *,
        metric: str, in_given_order: bool = False) -> dict:
    """Compare training runs; log the table and plot to a new comparison run.

    Inputs: an experiment name (None: all experiments) and/or run ids, `top` N rows by `metric`
    (any numeric column of the table, best first: see `top_runs`; equal scores oldest first, or in the order of
    `run_ids` with `in_given_order`). Every input is checked before the comparison run opens.
    Output: {"run_id", "table", "markdown", "artifacts"}.
    """
    run_ids = [r for r in (run_ids or []) if r]
    if top is not None and top < 1:
        raise config.ConfigError(f"top: must be >= 1, got {top}")
    if metric not in SORT_COLUMNS:
        raise config.ConfigError(f"metric: must be one of {', '.join(SORT_COLUMNS)}, got {metric!r}")
    steps.check_comparison_experiment(experiment)  # where the comparison goes, before hundreds of runs are read
    runs = steps.search_train_runs(experiment, run_ids)
    other_project, no_params = runs.attrs.get("other_project", 0), runs.attrs.get("no_params", 0)
    if in_given_order:  # a sweep's trials in trial order: it registers the first of its equals, the lowest numbered,
        #                 whose train run a worker beside it may have started a moment later than the next trial's
        position = {run_id: i for i, run_id in enumerate(run_ids)}
        runs = runs.sort_values("run_id", key=lambda ids: ids.map(position), kind="stable")
    else:  # among equal scores the earlier run leads
        runs = runs.sort_values("start_time", kind="stable")
    histories = {run_id: val_acc_history(run_id) for run_id in runs["run_id"]}
    runs["data_digest"] = runs["run_id"].map(steps.trained_data_digest)
    table = build_table(runs, histories)
    unranked = unranked_note(table, metric)
    table = top_runs(table, metric, top)
    unfinished = {} if run_ids else steps.unfinished_train_runs(experiment)  # named ones are each checked
    order = "lowest" if lower_is_better(metric) else "highest"
    markdown = (unranked + left_out_note(unfinished, other_project, no_params)
                + inert_note(runs, table) + data_note(table) + val_data_note(table) + test_data_note(table)
                + wall_note(table) + f"Training runs by {metric}, best ({order}) first:\n\n"
                + markdown_table(nan_shown(table), DECIMALS))
    name = f"compare-{len(table)}-runs-by-{metric}"
    # The files first, the run opened to record them: a plot that failed (a full disk) left a FAILED run holding none
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        nan_shown(table).to_csv(folder / "runs.csv", index=False)
        (folder / "runs.md").write_text(markdown)
        plot_curves(table, histories, folder / "val_acc.png", metric)
        with open_run("compare", experiment=experiment, run_name=name) as comparison:
            # Prefixed: `mlflow run` has already logged the entry-point parameters under their bare names.
            steps.log_comparison({"compare.experiment": experiment or "", "compare.metric": metric,
                                  "compare.top": top or ""}, list(table["run_id"]),
                                 markdown, folder)
            run_id = comparison.info.run_id
    print_comparison(markdown, run_id)
    return {"run_id": run_id, "table": table, "markdown": markdown,
            "artifacts": ["runs.md", "runs.csv", "val_acc.png", "compared_runs.txt"]}


def print_comparison(markdown: str, run_id: str) -> None:
    """The table and the comparison run's id on stdout. A reader that stopped reading (`| head`) ends the printing
    only: the comparison is recorded (a BrokenPipeError's traceback failed the run `mlflow run` opened for it)."""
    try:
        print(markdown, end="")
        print(f"comparison run {run_id}: runs.md, runs.csv, val_acc.png, compared_runs.txt", flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit: into /dev/null, with no second error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def split_ids(text: str) -> list[str]:
    """'a,b c' -> ['a', 'b', 'c']."""
    return [part for part in re.split(r"[,\s]+", text or "") if part]


def main() -> None:
    args = config.entry_point_parser(
        "compare", __doc__.split("\n")[0], experiment="experiment name (default: every experiment)",
        run_ids="training run ids, comma or space separated", top="keep the best N runs by --metric",
        metric=f"sort column, best first (wall_s and the counts of images trained on: lowest first): "
               f"{', '.join(SORT_COLUMNS)}").parse_args()
    run_ids = split_ids(args.run_ids)
    experiment = args.experiment or None
    try:
        top = int(args.top) if args.top else None
    except ValueError:
        raise config.ConfigError(f"top: must be an integer, got {args.top!r}") from None
    run(experiment, run_ids, top, metric=args.metric)


if __name__ == "__main__":
    cli(main)
