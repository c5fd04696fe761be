"""Learning new classes after deployment: a finished run goes on with a manifest of new classes.

    python train.py --continue runs/a/exmask --data new.csv [--phases K] [--eval-data a.csv] --out runs/b

From Python: `train(Config(continue_from="runs/a/exmask", data="new.csv", new_phases=1, out="runs/b"))`.

The run's method folder (or a run's folder holding one method) gives everything: checkpoint.pt (the
settings, adapters, head, memory and accuracy matrix, as --resume reads them), model.pt (the frozen
towers) and the tokenizer. The new classes are learned in K more phases (default one) with the run's
method and settings, replaying from its memory: run_method goes on from the run's checkpoint as
--resume goes on from its own. Every phase seeds its randomness from (seed, phase index), so phase
T + 1 of a continued run draws exactly what phase T + 1 of one longer run draws; no generator state
has to travel (a test checks that the accuracy matrices agree). The old folder is only read; the new
one holds the extended results.json, model.pt, model.onnx and labels.json over every class.

The rules; breaking one is a one-line `error:` (exit 2 from the command line):
- settings: a continued run keeps its run's settings (method, seed, budget, masking, epochs, batch
  size, learning rate, ...). A Config field left at its default takes the run's value; one given with
  another value is refused, by name.
- towers and tokenizer: the run's own (model.pt, and its tokenizer file: data.TOKENIZER_FILES). The new captions are
  encoded with the run's tokenizer, never a retrained one, and the images decoded at the run's image
  size; --vit, --text-model, --clip and another model config are refused.
- budget: the run's rule goes on. With --memory-per-class M every class, old and new, keeps M full
  exemplars' bytes, so the total grows with the classes as it did during the run; with --memory-bytes N
  the fixed total is shared by all classes, so the old ones give up their least representative exemplars.
- classes: the manifest holds new classes only; rows of classes the run knows are refused, by name.
- evaluation: each new phase is measured on the new classes' test rows. With --eval-data (the run's
  own manifest) the old classes' test rows are measured too, so forgetting is; without it the old
  classes' entries of the accuracy matrix are null and count in no figure.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import torch

import data as D
import models as M
import ranks
import train as T
from checkpoints import UNRECORDED, digest
from pictures import draw_accuracy


# ----------------------------------------------------------------------------- the run being continued

def find_run(path: str) -> str:
    """The method folder to continue: `path` itself, or the one method folder in a run's folder. A
    method folder with a checkpoint but no model.pt is a run that stopped before its end (train.py
    writes model.pt last): refused, with how to finish it."""
    if not os.path.isdir(path):
        raise SystemExit(f"error: --continue: no run folder {path}")
    has = lambda d, f: os.path.exists(os.path.join(d, f))
    if has(path, "checkpoint.pt"):
        folder = path
    else:
        subs = sorted(d for d in os.listdir(path) if has(os.path.join(path, d), "checkpoint.pt"))
        if len(subs) > 1:
            raise SystemExit(f"error: --continue: {path} holds several methods ({', '.join(subs)}); name one, "
                             f"e.g. {os.path.join(path, subs[0])}")
        if not subs:
            raise SystemExit(f"error: --continue: {path} holds no trained run (checkpoint.pt and model.pt, "
                             "as train.py writes them)")
        folder = os.path.join(path, subs[0])
    if not has(folder, "model.pt"):
        raise SystemExit(f"error: --continue: the run in {folder} did not finish (no model.pt); finish it first "
                         "(train.py with its settings and --resume)")
    return folder


def read_run(folder: str) -> dict:
    """A finished run: its checkpoint, model config, frozen towers and tokenizer, checked to belong
    together. Only read: nothing in the folder is written."""
    try:
        ck = torch.load(os.path.join(folder, "checkpoint.pt"), map_location="cpu", weights_only=True)
        saved = torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True)
        run = ck["run"]
        mcfg = M.ModelConfig.from_dict(saved["model_config"])
        model = M.TwoTower(mcfg, n_classes=len(saved["class_names"]))
        model.load_state_dict(saved["state"])    # strict: the towers are whole and of this config
    except Exception as e:   # truncated, foreign or from an older version: say which file, in one line
        raise SystemExit(f"error: --continue: cannot read the run in {folder} ({type(e).__name__}: "
                         f"{D.first_line(e, 160)})") from None
    if (run["towers"] != json.loads(json.dumps(asdict(mcfg))) or list(saved["class_names"]) != run["classes"]
            or ("backbone" in run and digest(model.backbone_state()) != run["backbone"])):   # (older runs: trusted)
        raise SystemExit(f"error: --continue: model.pt and checkpoint.pt in {folder} are from different runs")
    if len(ck["R"]) < run["phases"]:
        raise SystemExit(f"error: --continue: the run in {folder} stopped after phase {len(ck['R'])}/{run['phases']}; "
                         "finish it first (train.py with its settings and --resume)")
    tok = D.load_tokenizer(folder)
    if tok.vocab_size > mcfg.text.vocab_size:
        raise SystemExit(f"error: --continue: the tokenizer in {folder} ({tok.vocab_size} tokens) is not the "
                         f"towers' ({mcfg.text.vocab_size})")
    return {"ck": ck, "run": run, "mcfg": mcfg, "backbone": model.backbone_state(), "tok": tok}


def run_config(cfg: T.Config, run: dict, mcfg: M.ModelConfig) -> T.Config:
    """cfg with the run's settings (run_identity), method and towers: a field left at its default
    takes the run's value; a field given with another value is refused, by name."""
    default = T.Config()
    # a setting newer than the run: the run behaved as its default did (or as UNRECORDED says)
    theirs = {**{k: run.get(k, UNRECORDED.get(k, getattr(default, k))) for k in T.RUN_KEYS}, "methods": run["method"]}
    for k, v in theirs.items():
        mine = getattr(cfg, k)
        if mine != getattr(default, k) and mine != v:
            hint = " (the new classes' phases are --phases with --continue, new_phases in Config)" if k == "phases" else ""
            raise SystemExit(f"error: --continue: {k} {mine!r} given, the run's is {v!r}; a continued run keeps "
                             f"its run's settings{hint}")
    for k in ("seeds", "vit", "vit_file", "text_model", "clip"):
        if getattr(cfg, k):
            raise SystemExit(f"error: --continue: {k} {getattr(cfg, k)!r} given; a continued run keeps its run's "
                             "seed and towers (they are in its model.pt)")
    if cfg.model != default.model:   # the run's towers carry the tokenizer's vocabulary size: not compared
        flat = lambda m: {f"{k}.{j}" if isinstance(v, dict) else k: w for k, v in asdict(m).items()
                          for j, w in (v.items() if isinstance(v, dict) else [(None, v)])}
        given, towers, plain = flat(cfg.model), flat(mcfg), flat(default.model)
        for k in given:   # only what was given: a field left at its default takes the run's value
            if k != "text.vocab_size" and given[k] != plain[k] and given[k] != towers[k]:
                raise SystemExit(f"error: --continue: model.{k} {given[k]!r} given, the run's towers have "
                                 f"{towers[k]!r}; a continued run keeps its run's towers")
    return replace(cfg, **theirs, model=mcfg)


def check_out(out: str, given: str, folder: str, method: str) -> None:
    """The new run's folder must not be, or lie in, the run being continued, and its method folder
    (out/<method>) must not be the run's (a method folder copied out of its run, with --out the
    folder holding it): the run being continued is never modified."""
    mine = os.path.realpath(os.path.join(out, method))
    if mine == os.path.realpath(folder):
        raise SystemExit(f"error: --continue: --out {out} would write {mine}, the run being continued, which is "
                         "never modified; give another --out")
    roots = {os.path.realpath(given), os.path.realpath(folder)}
    parent = os.path.dirname(os.path.realpath(folder))
    if os.path.exists(os.path.join(parent, "results.json")):   # the run's own folder, above its method's
        roots.add(parent)
    new = os.path.realpath(out)
    for r in sorted(roots):
        if new == r or new.startswith(r + os.sep):
            raise SystemExit(f"error: --continue: --out {out} lies in the run being continued ({r}), which is "
                             "never modified; give another --out")


def check_data(cfg: T.Config, rcfg: T.Config, classes: list[str]) -> None:
    """Before any long work: the manifest holds new classes only and splits into the new phases, each
    with rows to measure it on; the eval manifest holds classes of the run only."""
    if not cfg.data:
        raise SystemExit("error: --continue needs --data: a manifest of the new classes")
    _, names, labels, is_test = D.manifest_table(cfg.data)
    known = [c for c in names if c in set(classes)]
    if known:
        raise SystemExit(f"error: --continue: {cfg.data} has rows of {len(known)} class(es) the run already knows "
                         f"({', '.join(known[:5])}{' ...' if len(known) > 5 else ''}); a continued run learns new "
                         "classes only: take those rows out")
    T.check_phases(replace(rcfg, phases=cfg.new_phases, first_phase=0), [rcfg.seed], names, labels,
                   D.carve_validation(labels, is_test, rcfg.val) if rcfg.val else is_test)
    if cfg.eval_data:
        try:
            _, old, _, _ = D.manifest_table(cfg.eval_data)
        except SystemExit as e:
            raise SystemExit(f"{e.code}; --eval-data is the run's own manifest (its split is read as the run read "
                             "it, and none of its rows is trained on)") from None
        unknown = sorted(set(old) - set(classes))
        if unknown:
            raise SystemExit(f"error: --eval-data {cfg.eval_data} has rows of class(es) the run does not know "
                             f"({', '.join(unknown[:5])}); give the run's own manifest")


# ----------------------------------------------------------------------------- the data

class Joined:
    """Two patch views (train.Patches) read as one: rows [0, len(a)) are a's, the rest b's."""

    def __init__(self, a, b):
        self.a, self.b = a, b
        self.shape = torch.Size((len(a) + len(b), *a.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        n = len(self.a)
        if isinstance(idx, int) or (torch.is_tensor(idx) and idx.dim() == 0):
            return self.a[int(idx)] if int(idx) < n else self.b[int(idx) - n]
        idx = torch.as_tensor(idx)
        idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long()
        out = torch.empty((len(idx), *self.shape[1:]), dtype=torch.uint8)         # (k, n_patches, 3*p*p)
        first = idx < n
        for sel, view, start in ((first, self.a, 0), (~first, self.b, n)):
            if sel.any():
                out[sel] = view[idx[sel] - start]
        return out


def join(new: dict, old: dict | None, classes: list[str]) -> dict:
    """One dataset (train.prepare's form) over every class: the new manifest's rows, labelled after the
    run's classes, then the eval manifest's rows, labelled as in the run, for measuring only (their
    training rows stand for data that is gone: none of them is trained on)."""
    out = dict(new, labels=new["labels"] + len(classes), class_names=classes + new["class_names"])
    if old is None:
        return out
    remap = torch.tensor([classes.index(c) for c in old["class_names"]])
    out.update(patches=Joined(new["patches"], old["patches"]), ids=torch.cat([new["ids"], old["ids"]]),
               labels=torch.cat([out["labels"], remap[old["labels"]]]),
               is_test=torch.cat([new["is_test"], old["is_test"]]),
               is_train=torch.cat([new["is_train"], torch.zeros_like(old["is_train"])]),
               texts=new["texts"] + old["texts"])
    if "objects" in new:   # the oracle masks look at new rows only
        out["objects"] = torch.cat([new["objects"], new["objects"].new_zeros(len(old["labels"]), new["objects"].shape[1])])
    return out


# ----------------------------------------------------------------------------- the job

def continue_run(cfg: T.Config, con) -> list[dict]:
    """train(cfg) with cfg.continue_from: learn cfg.data's classes in cfg.new_phases phases after the run;
    write <out>/results.json and <out>/<method>/ (model.pt, model.onnx, labels.json, checkpoint.pt)."""
    folder = find_run(cfg.continue_from)
    rd = read_run(folder)
    run, ck, mcfg, tok = rd["run"], rd["ck"], rd["mcfg"], rd["tok"]
    check_out(cfg.out, cfg.continue_from, folder, run["method"])
    if run["method"] == "joint":
        raise SystemExit("error: --continue: joint trains on every seen class's data, which a continued run no "
                         "longer has; continue a run of another method")
    rcfg = run_config(cfg, run, mcfg)
    T.check_processes(rcfg)   # the run's settings, not only those given
    check_data(cfg, rcfg, run["classes"])
    n_old = len(run["classes"])
    sizes = ck.get("classes_per_phase") or [len(c) for c in D.phase_classes(list(range(n_old)), run["phases"],
                                                                            run["first_phase"])]
    rcfg = replace(rcfg, phases=len(sizes) + cfg.new_phases)
    with ranks.main_first():   # the first process decodes the images into the cache, the others read it
        raw = T.read_data(rcfg, mcfg.vit.image_size)
        T.check_methods(rcfg, mcfg, raw, con, notes=False)   # e.g. oracle-mask's object masks, before phase 1
        new = T.prepare(raw, rcfg, mcfg, tok)   # the new classes in seeded order
        old = (T.prepare(T.read_data(replace(rcfg, data=cfg.eval_data), mcfg.vit.image_size), rcfg, mcfg, tok)
               if cfg.eval_data else None)
    if ranks.is_main():   # under torchrun (ranks.py) only the first process writes; a refused run leaves no folder
        os.makedirs(cfg.out, exist_ok=True)
    data = join(new, old, run["classes"])
    ends = torch.tensor(sizes).cumsum(0).tolist()
    phase_cls = ([list(range(e - s, e)) for s, e in zip(sizes, ends)]
                 + [[n_old + c for c in p] for p in D.phase_classes(list(range(len(new["class_names"]))), cfg.new_phases)])
    method, out = run["method"], os.path.join(cfg.out, run["method"])
    con.print(f"[{method}] continuing {folder} ({n_old} classes): {len(new['class_names'])} new classes in "
              f"{cfg.new_phases} phase(s)" + ("" if old else "; the old classes are not measured (no --eval-data)"))
    res, model = T.run_method(replace(rcfg, out=out), method, data, mcfg, rd["backbone"], tok, con, phase_cls, ck)
    res["settings"] = {**{k: getattr(rcfg, k) for k in T.RUN_KEYS}, "data": cfg.data, "eval_data": cfg.eval_data,
                       "continued_from": os.path.abspath(folder)}
    res["eval_split"] = "val" if rcfg.val else "test"
    ok = True
    if ranks.is_main():   # every result first: a failed export loses none of them
        T.save_model(out, model, data["class_names"], tok)
        D.write_json(os.path.join(cfg.out, "results.json"), res)
        T.show([res], con)
        draw_accuracy(os.path.join(cfg.out, "accuracy.png"), [res])
        ok = not cfg.export or T.exported(out, con)
    ranks.barrier()
    if not ok:
        raise SystemExit(f"error: the ONNX export failed for {method} (see above); every result is written")
    return [res]


if __name__ == "__main__":   # the command is train.py --continue: this only says how to use it
    print(__doc__)
