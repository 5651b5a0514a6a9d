"""`pesc eval --tasks`: lm-evaluation-harness tasks by name or YAML file, run on the PESC model
(harness/lm.py). lm-eval is the optional extra `eval` (pip install -e '.[eval]')."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pesc_megatron.schema import UserError

INSTALL_HINT = "lm-eval is not installed: pip install -e '.[eval]' (or pip install 'lm_eval>=0.4.13')"


def require_lm_eval() -> None:
    """lm-eval importable, and its log quiet on every rank but 0 (each runs it on the same
    requests). Its progress bars still show on every rank: lm-eval enables them itself."""
    if os.environ.get("RANK", "0") != "0":
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None


def task_manager(tasks: list[str], include_paths: list[str]):
    """(lm-eval TaskManager, task names) for `tasks`: names (lm-eval's, or of a task in an
    `include_paths` folder) or paths of task YAML files. lm-eval's own ~15k task files take
    seconds to index, so they are indexed only when a name is not found in the given ones."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    names, paths = [], []
    for folder in include_paths:
        if not Path(folder).is_dir():
            raise UserError(f"--include-path {folder}: not a folder")
        paths.append(str(Path(folder).resolve()))
    for task in tasks:
        path = Path(task)
        if task.endswith((".yaml", ".yml")) or path.is_file():
            if not path.is_file():
                raise UserError(f"--tasks {task}: no such task file")
            try:
                config = load_yaml(path)
            except Exception as e:  # yaml's and lm-eval's errors alike: the file is unusable
                raise UserError(f"{task}: not a task file lm-eval can read: "
                                f"{str(e).splitlines()[0]}") from None
            if not isinstance(config.get("task"), str):
                raise UserError(f"{task}: a task file needs a `task:` name")
            names.append(config["task"])
            paths.append(str(path.parent.resolve()))
        else:
            names.append(task)
    paths = list(dict.fromkeys(paths))  # a folder indexed twice warns of every task in it
    manager = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    if manager is None or len(manager.match_tasks(names)) < len(set(names)):
        manager = TaskManager(include_path=paths or None)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise UserError(f"--tasks: unknown task {', '.join(unknown)} (an lm-eval task name, a "
                        "task YAML file, or a task in an --include-path folder)")
    return manager, names


def write_results(results: dict, output: str, log_samples: bool) -> None:
    """lm-eval's results JSON at `output` and, with `log_samples`, one JSONL of per-sample logs
    per task beside it (`<output stem>_<task>.jsonl`), as `lm_eval --output_path` writes."""
    from lm_eval.utils import handle_non_serializable

    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    tmp.replace(out)
    if log_samples and samples:
        for task, rows in samples.items():
            target = out.with_name(f"{out.stem}_{task}.jsonl")
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, default=handle_non_serializable) + "\n"
                                   for r in rows))
            tmp.replace(target)


def tokenizer_for_tasks(folder: Path):
    """(Hugging Face tokenizer, generation config's end token ids): what lm-eval's HF model
    uses on an export of this checkpoint (whose tokenizer files are these)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}: pesc eval --tasks needs a Hugging Face tokenizer folder "
                        f"({str(e).splitlines()[0]})") from None
    config = Path(folder) / "generation_config.json"
    eos = json.loads(config.read_text()).get("eos_token_id") if config.is_file() else None
    return tok, [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def run_tasks(lm, manager, names: list[str], num_fewshot: int | None, limit: float | None,
              log_samples: bool, apply_chat_template: bool, unsafe_code: bool) -> dict:
    """lm-eval's simple_evaluate on `lm`: its results dict (with "samples" if asked)."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                           log_samples=log_samples, task_manager=manager,
                           apply_chat_template=apply_chat_template,
                           confirm_run_unsafe_code=unsafe_code)
