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


def _reserved(group: str, start: int, count: int) -> list[str]:
    return [f"<|{group}_reserved_special_token_{i}|>" for i in range(start, start + count)]


# Every special slot of Llama 4 in id order, as in the released Hugging Face `tokenizer.json`:
# 5 basic tokens, 75 text post-training slots, 1054 vision slots (offsets 0..1133). Slots after
# those have no published name; herd calls them <|reserved_special_token_N|>.
LLAMA4_SPECIAL_TOKENS: list[str] = (
    ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    + ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    + _reserved("text_post_train", 0, 6)
    + ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    + _reserved("text_post_train", 6, 61)
    + ["<|image_start|>", "<|image_end|>"] + _reserved("vision", 0, 2)
    + ["<|tile_x_separator|>", "<|tile_y_separator|>"] + _reserved("vision", 2, 4)
    + ["<|image|>"] + _reserved("vision", 6, 1) + ["<|patch|>"]
    + _reserved("vision", 7, 1041)
)


def special_token_names(num_slots: int) -> list[str]:
    """The names of the first `num_slots` special tokens, in id order (index = offset)."""
    if num_slots < MIN_SPECIAL_SLOTS:
        raise ValueError(f"num_special_slots must be at least {MIN_SPECIAL_SLOTS} to hold "
                         f"<|patch|> (offset {OFFSETS['<|patch|>']}), got {num_slots}")
    names = LLAMA4_SPECIAL_TOKENS[:num_slots]
    extra = num_slots - len(names)
    return names + [f"<|reserved_special_token_{i}|>" for i in range(extra)]
