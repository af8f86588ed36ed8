"""`mlsd retrain --source SPEC`: a challenger trained on new data, promoted only if it is better.

1. The champion is the version behind `retrain.alias` (production). The new data is prepared like
   any source, at the champion's image size and channels; its class names must be the
   champion's (InputError, exit 2, naming the difference).
2. Training data = the champion's train/val splits plus the new data's (`retrain.keep_old_data`),
   written as one prepared dataset that keeps the champion's normalisation (its test split is
   both test splits, so a later retrain's "old test" covers every earlier holdout). The
   challenger trains from the champion's weights (`finetune`) or from scratch, and is registered
   as a new version. Its drift reference describes the new data: traffic is expected to look
   like it from now on, so monitoring the promoted model against old-plus-new would flag both
   the old world and the new one.
3. Champion and challenger are scored on the same holdout: the champion's old test split plus
   the new data's test split. The challenger is promoted only if its holdout accuracy beats the
   champion's by more than `retrain.margin`; a running Serve app then rolls over to it.
4. decision.json and decision.md go to $MLSD_HOME/retrain/<time>/. `dry_run` decides only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from mlsd_ray import storage
from mlsd_ray.config import Config
from mlsd_ray.data.prepare import PreparedDataset, prepare_dataset
from mlsd_ray.errors import InputError
from mlsd_ray.runtime import log_stderr

SPLITS = ("train", "val", "test")


def check_classes(model_classes: list[str], data_classes: list[str], source: str) -> None:
    """InputError unless the new data has exactly the model's classes, in the same order."""
    if data_classes == model_classes:
        return
    extra = sorted(set(data_classes) - set(model_classes))
    missing = sorted(set(model_classes) - set(data_classes))
    detail = (f"classes the model does not know: {extra}; " if extra else "") + (
        f"model classes missing from it: {missing}" if missing else "")
    raise InputError(f"retrain source {source} has another label set than the model: "
                     + (detail or f"order {data_classes} vs the model's {model_classes}"))


def combine(parts: dict[str, list[PreparedDataset]], champion_pre: dict, name: str,
            home: str | None) -> PreparedDataset:
    """One prepared dataset whose splits concatenate the given datasets' splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = "|".join(f"{s}:{','.join(d.manifest['fingerprint'] for d in ds)}"
                   for s, ds in parts.items())
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = storage.join(storage.home(home), "datasets", name, fingerprint)
    counts = {}
    for split, datasets in parts.items():
        tables = []
        for dataset in datasets:
            fs, path = storage.filesystem(dataset.split_path(split))
            tables.append(pq.read_table(path, filesystem=fs))
        table = pa.concat_tables(tables)
        fs, path = storage.filesystem(storage.join(out, split, "part-0.parquet"))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs)
        counts[split] = table.num_rows
    newest = parts["train"][0].manifest
    manifest = {**newest, "name": name, "fingerprint": fingerprint,
                "source": " + ".join(d.manifest["source"] for d in parts["train"]),
                "counts": {**newest["counts"], "splits": counts},
                "splits": {s: storage.join(out, s) for s in SPLITS},
                "preprocessing": champion_pre}
    storage.write_json(storage.join(out, "manifest.json"), manifest)
    return PreparedDataset(out, manifest)


def holdout_scores(loaded, parts: dict[str, PreparedDataset]) -> dict:
    """Accuracy on each holdout part and on all of them together."""
    from mlsd_ray.train import predict_split

    scores, correct, total = {}, 0, 0
    for name, dataset in parts.items():
        result = predict_split(loaded, dataset, "test")
        scores[name] = {"accuracy": round(result.accuracy, 4), "images": result.samples}
        correct += round(result.accuracy * result.samples)
        total += result.samples
    scores["holdout"] = {"accuracy": round(correct / max(total, 1), 4), "images": total}
    return scores


def challenger_config(cfg: Config, champion, champion_name: str) -> Config:
    """The champion's architecture, the retrain epochs and learning rate, the champion's name."""
    tree = cfg.to_dict()
    tree["model"] = {**tree["model"], "name": champion.model_config["name"],
                     "dropout": champion.model_config.get("dropout", tree["model"]["dropout"])}
    lr = cfg.retrain.lr or (cfg.train.lr / 3 if cfg.retrain.mode == "finetune" else cfg.train.lr)
    tree["train"] = {**tree["train"], "epochs": cfg.retrain.epochs or cfg.train.epochs,
                     "lr": lr, "run_name": None}
    tree["registry"] = {**tree["registry"], "auto_register": True, "model_name": champion_name}
    return Config.model_validate(tree)


def retrain(cfg: Config, source: str, home: str | None = None, model: str | None = None,
            dry_run: bool = False, log: Callable[[str], None] = log_stderr,
            roll_out: bool = True) -> dict:
    """Train a challenger on `source`, compare, promote and roll out (see the module docstring).

    With `roll_out=False` a promoted challenger is not deployed (the pipeline deploys it itself,
    under load)."""
    from mlsd_ray import registry
    from mlsd_ray.checkpoint import load_model
    from mlsd_ray.runtime import ensure_ray
    from mlsd_ray.serve.control import resolve_model_ref
    from mlsd_ray.train import fit_to_free_cpus, train_and_register

    started = time.perf_counter()
    champion_ref = model or cfg.serve.model
    champion_info = resolve_model_ref(champion_ref, home)
    if champion_info["version"] == "local":
        raise InputError("retrain needs a registered champion (models:/NAME@ALIAS), not a "
                         "checkpoint folder: gated promotion moves a registry alias")
    champion_dir = registry.resolve(champion_info["uri"], home)
    champion = load_model(champion_dir)
    pre = champion.preprocessor
    log(f"champion {champion_info['uri']} ({champion.model_config['name']}); new data {source}")

    new_cfg = cfg.model_copy(deep=True)
    new_cfg.data.source, new_cfg.data.name = source, None
    new_cfg.data.image_size, new_cfg.data.channels = pre.image_size, pre.channels
    new = prepare_dataset(new_cfg, home=home, log=log)
    check_classes(pre.class_names, new.manifest["class_names"], source)
    old = PreparedDataset.open(champion.metadata["dataset"]["path"])

    mode = cfg.retrain.mode
    train_parts = [new, old] if cfg.retrain.keep_old_data else [new]
    combined = combine({"train": train_parts, "val": train_parts, "test": [new, old]},
                       champion.preprocessor.to_dict(), f"retrain-{new.manifest['name']}", home)
    log(f"challenger: {mode}, {combined.manifest['counts']['splits']['train']} training images "
        f"({'new + old' if cfg.retrain.keep_old_data else 'new only'})")
    challenger_cfg = challenger_config(cfg, champion, champion_info["name"])
    ensure_ray(home)
    fit_to_free_cpus(challenger_cfg.train, log)
    trained = train_and_register(challenger_cfg, home, log, dataset=combined,
                                 init_from=champion_dir if mode == "finetune" else None,
                                 reference=new)
    challenger_uri = trained["registered"]["uri"]
    challenger = load_model(registry.resolve(challenger_uri, home))

    holdout = {"old_test": old, "new_test": new}
    scores = {"champion": holdout_scores(champion, holdout),
              "challenger": holdout_scores(challenger, holdout)}
    gain = scores["challenger"]["holdout"]["accuracy"] - scores["champion"]["holdout"]["accuracy"]
    better = gain > cfg.retrain.margin
    decision = {"champion": champion_info["uri"], "challenger": challenger_uri, "mode": mode,
                "source": source, "scores": scores, "gain": round(gain, 4),
                "margin": cfg.retrain.margin, "promote": better and not dry_run,
                "dry_run": dry_run, "alias": cfg.retrain.alias,
                "reason": (f"challenger {'beats' if better else 'does not beat'} the champion "
                           f"by more than {cfg.retrain.margin} on the holdout "
                           f"({gain:+.4f})")}
    log(decision["reason"])
    if decision["promote"]:
        version = int(trained["registered"]["version"])
        registry.promote(champion_info["name"], version, cfg.retrain.alias, home)
        log(f"promoted {challenger_uri} to @{cfg.retrain.alias}")
        if roll_out:
            decision["rollout"] = _roll_out(challenger_uri, cfg, home, log)
    decision["seconds"] = round(time.perf_counter() - started, 1)
    decision["outputs"] = _write_decision(decision, home)
    return decision


def _roll_out(uri: str, cfg: Config, home: str | None, log: Callable[[str], None]) -> dict:
    """Move a running Serve app to `uri`; a note when none runs."""
    from mlsd_ray.serve import control

    if not control.state_file(home, cfg.serve.app_name).is_file():
        return {"skipped": f"no running app {cfg.serve.app_name!r}: the next `mlsd serve` "
                           f"serves @{cfg.retrain.alias}"}
    return control.deploy(uri, home, cfg.serve.app_name, log)


def _write_decision(decision: dict, home: str | None) -> dict:
    out = storage.join(storage.home(home), "retrain", time.strftime("%Y%m%d-%H%M%S"))
    paths = {"json": storage.join(out, "decision.json"), "markdown": storage.join(out,
                                                                                  "decision.md")}
    rows = [f"| {who} | " + " | ".join(f"{decision['scores'][who][part]['accuracy']:.4f}"
                                       for part in ("old_test", "new_test", "holdout")) + " |"
            for who in ("champion", "challenger")]
    verdict = "promoted" if decision["promote"] else ("would promote (dry run)" if decision[
        "dry_run"] and decision["gain"] > decision["margin"] else "rejected")
    text = "\n".join([
        f"# Retrain decision: {verdict}", "",
        f"Champion {decision['champion']}, challenger {decision['challenger']} "
        f"({decision['mode']} on {decision['source']}).", "",
        "| model | old test | new holdout | all holdout |", "|---|---|---|---|", *rows, "",
        decision["reason"] + ".", ""])
    storage.write_text(paths["markdown"], text)
    storage.write_json(paths["json"], decision)
    return paths

