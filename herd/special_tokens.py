"""Llama 4's special tokens, by offset from the first special id (the number of BPE ranks).

Llama 4 has 200,000 BPE ranks and 2,048 special slots after them. herd's own small tokenizers keep
the same names in the same relative order but may reserve fewer slots; every id the model and chat
format need follows from `first_special_id`. Unlisted offsets are reserved slots.
"""

LLAMA4_NUM_BPE_RANKS = 200_000
LLAMA4_NUM_SPECIAL_SLOTS = 2_048

OFFSETS = {
    "<|begin_of_text|>": 0,
    "<|end_of_text|>": 1,
    "<|fim_prefix|>": 2,
    "<|fim_middle|>": 3,
    "<|fim_suffix|>": 4,
    "<|header_start|>": 5,
    "<|header_end|>": 6,
    "<|eom|>": 7,
    "<|eot|>": 8,
    "<|step|>": 9,
    "<|python_start|>": 16,
    "<|python_end|>": 17,
    "<|finetune_right_pad|>": 18,
    "<|image_start|>": 80,
    "<|image_end|>": 81,
    "<|tile_x_separator|>": 84,
    "<|tile_y_separator|>": 85,
    "<|image|>": 90,
    "<|patch|>": 92,
}

# The smallest number of special slots that holds every named token above.
MIN_SPECIAL_SLOTS = max(OFFSETS.values()) + 1


def special_id(name: str, first_special_id: int) -> int:
    return first_special_id + OFFSETS[name]
