#!/usr/bin/env bash
# LoRA training of Qwen-Image-Edit-2509 on the fused (merged-QKV) transformer: the seed's script, same flags and
# defaults, run by qwen-fused.
#   single GPU:      bash qwen_fused/scripts/Qwen-Image-Edit-2509-lora-efficient.sh
#   several GPUs:    NUM_PROCESSES=8 bash qwen_fused/scripts/Qwen-Image-Edit-2509-lora-efficient.sh
#   FSDP, full size: CONFIG=qwen_fused/fsdp_config.yaml bash qwen_fused/scripts/Qwen-Image-Edit-2509-lora-efficient.sh
# Extra arguments are passed on (e.g. --resume_from_checkpoint latest, --lora_fused lightning.safetensors:1.0).
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen-Image-Edit-2509}
DATA=${DATA:-data/example_image_dataset}
OUT=${OUT:-models/train/Qwen-Image-Edit-2509_lora}
LAUNCH=(accelerate launch --num_processes "${NUM_PROCESSES:-1}" --mixed_precision bf16)
if [[ -n "${CONFIG:-}" ]]; then LAUNCH=(accelerate launch --config_file "$CONFIG"); fi

"${LAUNCH[@]}" -m qwen_fused.train \
  --pretrained_model_name_or_path "$MODEL" \
  --dataset_base_path "$DATA" \
  --dataset_metadata_path "$DATA/metadata_edit.csv" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --cache \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --lora_rank 32 \
  --lora_target_modules "to_qkv,add_qkv_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1" \
  --use_gradient_checkpointing \
  --mixed_precision bf16 \
  --save_steps 500 \
  --report_to tensorboard \
  --output_dir "$OUT" \
  "$@"
