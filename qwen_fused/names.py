"""The q/k/v module names: the one home of the merged <-> standard name map (no imports: every layer uses it)."""

# merged projection -> its standard parts, in row order (q, k, v): `to_qkv.weight = cat([to_q, to_k, to_v])`
STREAMS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
# standard part -> (merged projection, row block index)
STANDARD = {std: (merged, i) for merged, stds in STREAMS.items() for i, std in enumerate(stds)}
# the order in which diffusers' Attention registers each stream's parts (the text stream: k, v, q); unfusing
# restores it, so that the state dict comes back with the same key order
STOCK_ORDER = {"to_qkv": STREAMS["to_qkv"], "add_qkv_proj": ("add_k_proj", "add_v_proj", "add_q_proj")}
