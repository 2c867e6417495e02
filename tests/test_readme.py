"""The README's Python examples run as written against the installed diffusers (on a tiny pipeline)."""
import ast
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import qwen_fused
from qwen_fused.tiny import save_tiny_pipeline, tiny_edit_pipeline

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(section: str) -> str:
    """The first ```python block under the README heading `## <section>`."""
    text = README.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def random_lora(transformer, path, seed):
    """A standard-layout (diffusers keys) LoRA of rank 2 on every attention projection."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_v_proj", "attn.to_out.0")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, mod.in_features, generator=g)
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 2, generator=g)
    save_file(sd, path)


def test_lora_example(tmp_path, monkeypatch):
    pipe = tiny_edit_pipeline(variant="2509")
    random_lora(pipe.transformer, tmp_path / "style.safetensors", seed=0)
    random_lora(pipe.transformer, tmp_path / "lightning.safetensors", seed=1)
    qwen_fused.fuse_qkv(pipe)  # the drop-in example's state
    monkeypatch.chdir(tmp_path)
    scope = {"pipe": pipe, "qwen_fused": qwen_fused}
    exec(compile(python_block("LoRA"), "README.md: LoRA", "exec"), scope)
    assert "style" in pipe.transformer.peft_config
    assert any(k.startswith("lora_unet_") for k in load_file(tmp_path / "out.safetensors"))  # kohya layout
    assert any("to_qkv" in k for k in scope["sd"])  # converted to the merged form


def test_drop_in_loads_without_deprecation_warnings(tmp_path):
    """The drop-in example's `from_pretrained` arguments, on a saved tiny pipeline: no FutureWarning."""
    call = next(node for node in ast.walk(ast.parse(python_block("Drop-in use")))
                if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained")
    kwargs = {k.arg: eval(compile(ast.Expression(k.value), "README.md", "eval"), {"torch": torch})
              for k in call.keywords}
    save_tiny_pipeline(tmp_path / "tiny", variant="edit")
    from diffusers import QwenImageEditPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = QwenImageEditPipeline.from_pretrained(tmp_path / "tiny", **kwargs)
    assert pipe.transformer.dtype == torch.bfloat16


def test_readme_says_which_file_goes_to_which_tool():
    """Issue 21: the plain-named checkpoint is the standard layout (every tool reads it), the merged copy is marked
    as this package's only, and the edit example gives `--lora` the plain-named file."""
    text = README.read_text()
    training = text.split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in training.splitlines() if line.startswith("| `")}
    plain = next(v for k, v in rows.items() if "`checkpoint-final.safetensors`" in k)
    merged = next(v for k, v in rows.items() if "`checkpoint-final-merged.safetensors`" in k)
    assert "standard" in plain and "stock diffusers" in plain and "ComfyUI" in plain, plain
    assert "merged" in merged and "this package only" in merged, merged
    editing = text.split("\n## Editing\n", 1)[1].split("\n## ", 1)[0]
    lora = re.search(r"--lora (\S+)", editing).group(1)
    assert lora.endswith("/checkpoint-final.safetensors"), lora


def test_set_up_is_two_commands():
    """.ci/run runs the set-up block's lines verbatim and wants exactly two."""
    block = README.read_text().split("\n## Set up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert len([line for line in block.splitlines() if line.strip()]) == 2
