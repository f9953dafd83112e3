import numpy as np

from biovita.prompts import TEMPLATES, Taxon

T = Taxon("Aves", "Passeriformes", "Parulidae", "Setophaga", "Setophaga petechia", "Yellow Warbler")


def test_prompt_strings_are_exactly_the_methods():
    assert T.prompt("com") == "Yellow Warbler"
    assert T.prompt("sci") == "Setophaga petechia"
    assert T.prompt("tax") == "Aves Passeriformes Parulidae Setophaga Setophaga petechia"
    assert T.prompt("sci_com") == "Setophaga petechia with common name Yellow Warbler"
    assert T.prompt("tax_com") == "Aves Passeriformes Parulidae Setophaga Setophaga petechia with common name Yellow Warbler"
    assert [T.name(lvl) for lvl in ("species", "genus", "family", "common")] == [
        "Setophaga petechia", "Setophaga", "Parulidae", "Yellow Warbler"]


def test_random_prompt_uses_the_callers_generator_only():
    state = np.random.get_state()
    a = [T.random_prompt(np.random.default_rng(3)) for _ in range(3)]
    b = [T.random_prompt(np.random.default_rng(3)) for _ in range(3)]
    assert a == b
    many = {T.random_prompt(np.random.default_rng(i)) for i in range(200)}
    assert many == set(T.prompts()) and len(TEMPLATES) == 5
    assert np.all(np.random.get_state()[1] == state[1])  # global RNG untouched


def test_levels_prompts_add_bare_genus_and_family_names():
    """Stage 0's "levels" mode: the species templates plus the bare higher ranks, so the base
    model's text tower learns what the benchmark embeds at genus and family level."""
    from biovita.data.decode import ImageDecodeSpec, _prompt
    from biovita.prompts import LEVEL_TEMPLATES
    from biovita.train.stages import STAGE0, STAGE1

    drawn = {T.random_prompt(np.random.default_rng(i), LEVEL_TEMPLATES) for i in range(300)}
    assert drawn == set(T.prompts()) | {"Setophaga", "Parulidae"}
    row = {"id": "x", "species_id": 1, "class": "Aves", "order": "Passeriformes", "family": "Parulidae",
           "genus": "Setophaga", "scientific_name": "Setophaga petechia", "common_name": "Yellow Warbler"}
    got = {_prompt(row, ImageDecodeSpec(prompts="levels", epoch=e), 0) for e in range(300)}
    assert {"Setophaga", "Parulidae"} <= got
    assert not {"Setophaga", "Parulidae"} & {_prompt(row, ImageDecodeSpec(epoch=e), 0) for e in range(300)}
    assert STAGE0.prompts == "levels" and STAGE1.prompts == "random"
