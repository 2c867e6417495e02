"""The package's layers: the kernels know tensors only and import that way (issue 13)."""
import subprocess
import sys


def test_kernels_import_without_diffusers_or_peft():
    code = ("import sys, qwen_fused.kernels\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'peft', 'transformers'))\n"
            "assert not heavy, heavy[:5]\n"
            "import qwen_fused\n"
            "assert callable(qwen_fused.fuse_qkv) and 'diffusers' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
