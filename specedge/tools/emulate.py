"""`--emulate TARGET_PROFILE,DRAFT_PROFILE` for `specedge bench`: record the real pair once on the
bench's prompts (cached), and write the emulation file both emulated engines read
(specedge/emulation.py). The bench then runs the real product on it, unchanged.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from specedge.emulation import Recording, bundle, read_profile, record


def profiles(spec: str) -> tuple[dict, dict, list[str]]:
    """(target profile, draft profile, their paths) of `--emulate TARGET.json,DRAFT.json`."""
    paths = [p for p in spec.split(",") if p]
    if len(paths) != 2:
        raise ValueError("--emulate takes TARGET_PROFILE.json,DRAFT_PROFILE.json (`specedge profile`)")
    return read_profile(paths[0], "target"), read_profile(paths[1], "draft"), paths


def recordings(args, prompts: list[str]) -> tuple[list[Recording], dict, dict]:
    """The real pair's recordings of the prompts (cached under the models' hashes), and what the
    emulated target and draft stand for: shapes and the files their tokenizers come from."""
    from specedge.cloud.registry import open_engine, resolve_engine, weights_held
    from specedge.config import DraftConfig
    from specedge.device.backends import open_engine as open_draft
    from specedge.exactness import establish
    from specedge.fetch import cache_dir, resolve, sha256_file

    target_path, target_sha = resolve(args.target)
    draft_path, draft_sha = resolve(args.draft)
    engine = resolve_engine(args.engine, target_path)
    draft_cfg = DraftConfig(model=args.draft, weights=args.draft_weights, backend=args.draft_backend)
    key = json.dumps({"target": target_sha or sha256_file(target_path), "engine": engine,
                      "draft": draft_sha or sha256_file(draft_path), "backend": args.draft_backend,
                      "prompts": prompts, "max_new": args.max_new_tokens, "max_draft": args.max_draft, "v": 1})
    path = cache_dir() / "emulation" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    if path.exists():
        data = json.loads(path.read_text())
        # The same files (by hash) may lie elsewhere now: the tokenizers are read from where they are.
        data["target"]["tokenizer"], data["draft"]["tokenizer"] = str(target_path), str(draft_path)
        return [Recording.from_json(r) for r in data["recordings"]], data["target"], data["draft"]
    print(f"emulation: recording {args.target} ({engine}) and {args.draft} on {len(prompts)} prompts ...",
          file=sys.stderr, flush=True)
    target, target_tok = open_engine(engine, target_path, target_sha, weights_held(engine, args.target_weights), True)
    draft, draft_tok = open_draft(draft_cfg)
    ids = [draft_tok.encode_chat(p) for p in prompts]  # what the device worker sends
    establish(target)
    recs = record(target, draft, ids, args.max_new_tokens, args.max_draft, target_tok.stop_ids)
    about_target = {"model": args.target, "engine": engine, "tokenizer": str(target_path),
                    "vocab_size": target.cfg.vocab_size, "max_seq_len": target.cfg.max_seq_len,
                    "n_layers": target.cfg.n_layers, "exactness": target.exactness.summary()}
    about_draft = {"model": args.draft, "backend": draft.backend, "tokenizer": str(draft_path),
                   "vocab_size": draft.vocab_size}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"target": about_target, "draft": about_draft,
                                "recordings": [r.to_json() for r in recs]}))
    return recs, about_target, about_draft


def emulation_file(args, prompts: list[str], folder: Path) -> tuple[Path, dict]:
    """(the emulation file for this bench, what the report says about it)."""
    target_profile, draft_profile, paths = profiles(args.emulate)
    recs, about_target, about_draft = recordings(args, prompts)
    path = folder / "emulation.json"
    path.write_text(json.dumps(bundle(recs, target_profile, draft_profile, about_target, about_draft)))
    about = {"emulated": True, "target_profile": paths[0], "draft_profile": paths[1],
             "target_profile_machine": target_profile.get("machine", {}).get("cpu"),
             "target_profile_engine": target_profile.get("engine"),
             "draft_profile_engine": draft_profile.get("engine"),
             "recorded": {"target": about_target["model"], "engine": about_target["engine"],
                          "draft": about_draft["model"], "backend": about_draft["backend"]}}
    return path, about
