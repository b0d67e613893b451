"""app/recipe.py: the recipe a run's flags resolve to, its checks, the run length and the lr help."""

import re
from pathlib import Path

import pytest
from conftest import markdown_rows

from byol_pytorch.app.errors import UserError
from byol_pytorch.app.recipe import (
    CONVNEXT_LR_PER_256,
    DEFAULT_EPOCHS,
    FAMILY_OPTIMIZERS,
    MOBILE_LR_PER_256,
    RECIPE_DEFAULTS,
    check_sizes,
    family_lr,
    family_of,
    get_args_parser,
    lr_help,
    optimizer_for,
    run_length,
)
from byol_pytorch.app.recipe import resolve_recipe as resolve
from byol_pytorch.training.distributed import DistContext
from byol_pytorch.training.optim import OPTIMIZERS
from byol_pytorch.training.recipe import Recipe


def parse(*argv):
    return get_args_parser().parse_args(list(argv))


def test_defaults_are_the_papers_with_the_optimizers_lr_and_decay():
    recipe = resolve(parse("--optimizer", "lars"), None)
    assert recipe.to_dict().keys() == RECIPE_DEFAULTS.keys()
    assert recipe.model == "resnet50" and recipe.image_size == 224 and recipe.optimizer == "lars"
    assert recipe.tau_base == 0.996 and recipe.projection_size == 256 and recipe.batch_size == 256
    assert recipe.lr == pytest.approx(0.2) and recipe.weight_decay == 1.5e-6  # BYOL, App. C, at batch 256
    adamw = resolve(parse("--optimizer", "adamw", "--batch-size", "512"), None)
    assert adamw.lr == pytest.approx(5e-4 * 2) and adamw.weight_decay == 0.04
    given = resolve(parse("--lr", "0.3", "--weight-decay", "0", "--model", "resnet18", "--seed", "5"), None)
    assert (given.lr, given.weight_decay, given.model, given.seed) == (0.3, 0.0, "resnet18", 5)


def test_a_resumed_run_keeps_its_recipe_and_a_contradicting_flag_is_an_error():
    saved = resolve(parse("--model", "resnet18", "--batch-size", "64", "--optimizer", "sgd"), None).to_dict()
    assert resolve(parse(), saved).to_dict() == saved
    assert resolve(parse("--batch-size", "64", "--workers", "2"), saved).to_dict() == saved  # agreeing or runtime flags
    with pytest.raises(UserError) as info:
        resolve(parse("--batch-size", "32"), saved)
    assert str(info.value).startswith(
        "--batch-size 32 differs from the checkpoint's 64: a resumed run keeps its recipe"
    )
    with pytest.raises(UserError, match="--tau-base 0.9 differs from the checkpoint's 0.996"):
        resolve(parse("--tau-base", "0.9"), saved)
    # a rate as the start-up line prints it (6 digits) is the run's rate: a probe's "--lr 0.001563 differs from
    # the checkpoint's 0.0015625" when the line said 0.001563
    odd = resolve(parse("--lr", "0.00156253125", "--batch-size", "64"), None).to_dict()  # 12 digits
    assert resolve(parse("--lr", f"{odd['lr']:.6g}"), odd).lr == odd["lr"]
    with pytest.raises(UserError, match="--lr 0.0016 differs from the checkpoint.s 0.00156253125"):
        resolve(parse("--lr", "0.0016"), odd)
    seeded = resolve(parse("--seed", "123456"), None).to_dict()
    with pytest.raises(UserError, match="--seed 123457 differs from the checkpoint's 123456"):
        resolve(parse("--seed", "123457"), seeded)  # whole numbers stay exact (the review)
    older = {k: v for k, v in saved.items() if k != "views_in_one_batch"}  # a checkpoint from before the flag
    assert resolve(parse(), older).views_in_one_batch is False  # it ran without: the flag cannot change that
    with pytest.raises(UserError, match="--views-in-one-batch True differs from the checkpoint's False"):
        resolve(parse("--views-in-one-batch"), older)


def _recipe(**kwargs):
    return Recipe(**{**RECIPE_DEFAULTS, "image_size": 32, "batch_size": 8, **kwargs})


def test_check_sizes_returns_the_micro_batch_of_one_process():
    assert check_sizes(_recipe(), DistContext()) == 8
    assert check_sizes(_recipe(in_chans=1), DistContext()) == check_sizes(_recipe(in_chans=4096), DistContext()) == 8
    assert check_sizes(_recipe(accumulate=2), DistContext(world_size=2)) == 2


@pytest.mark.parametrize(
    "changes, world, message",
    [
        (dict(image_size=7), 1, "--image-size must be at least 8 pixels, got 7"),
        (dict(accumulate=0), 1, "--accumulate must be at least 1, got 0"),
        # a torchrun probe: a negative count was a traceback from the net's first convolution, 0 a probe failure
        (dict(in_chans=-1), 1, r"--in-chans must be between 1 and 4096 \(1: grayscale, 3: RGB\), got -1"),
        (dict(in_chans=0), 1, "--in-chans must be between 1 and 4096 .*got 0"),
        (dict(in_chans=5000), 1, "--in-chans must be between 1 and 4096 .*got 5000"),
        (dict(tau_base=1.5), 1, r"--tau-base must be in \[0, 1\] \(the paper: 0.996\), got 1.5"),
        (dict(batch_size=1), 1, "--batch-size 1 cannot be split into 1 process"),
        (
            dict(batch_size=6, accumulate=2),
            2,
            "--batch-size 6 cannot be split .* use a multiple of 4 that is at least 8",
        ),
        (dict(batch_size=4, accumulate=2), 2, "use a multiple of 4 that is at least 8"),  # 1 image per micro-batch
    ],
)
def test_check_sizes_errors(changes, world, message):
    with pytest.raises(UserError, match=message):
        check_sizes(_recipe(**changes), DistContext(world_size=world))


@pytest.mark.parametrize(
    "batch, accumulate, world, fits",
    [
        (30, 1, 4, "resume it on 3 or 5 process(es)"),
        (2, 1, 2, "resume it on 1 process(es)"),
        (24, 2, 5, "on 4 or 6 process(es)"),
    ],
)
def test_a_resumed_batch_that_does_not_split_names_the_process_counts_that_do(batch, accumulate, world, fits):
    """Multi-process probe: a run of batch 30 resumed on 4 processes was told to use a multiple of 4 for --batch-size,
    which the resumed run then refused as differing from its checkpoint's."""
    with pytest.raises(UserError) as error:
        check_sizes(_recipe(batch_size=batch, accumulate=accumulate), DistContext(world_size=world), resumed=True)
    message = str(error.value)
    assert message.startswith(f"the resumed run's batch of {batch} images in {accumulate} accumulation step(s) (its")
    assert fits in message and "start a new run with another --out" in message and "--batch-size" not in message
    assert check_sizes(_recipe(batch_size=30), DistContext(world_size=3), resumed=True) == 10
    with pytest.raises(UserError) as error:  # review: a checkpoint no process count splits (edited): no traceback
        check_sizes(_recipe(batch_size=2, accumulate=2), DistContext(world_size=1), resumed=True)
    assert "resume it on" not in str(error.value) and str(error.value).endswith("start a new run with another --out")


def test_run_length_from_max_steps_epochs_the_saved_total_or_the_default():
    recipe = _recipe()
    assert run_length(parse("--max-steps", "50", "--epochs", "3"), recipe, 7, 400) == (50, 5)  # --max-steps wins
    assert run_length(parse("--epochs", "3"), recipe, 7, 400) == (21, 2)
    assert run_length(parse(), recipe, 7, 400) == (400, 40)  # a resumed run keeps its total
    assert run_length(parse(), recipe, 7, None) == (DEFAULT_EPOCHS * 7, 70)  # 10 epochs of 7 steps


def test_warm_up_is_ten_epochs_capped_at_a_tenth_unless_given():
    recipe = _recipe()
    assert run_length(parse("--max-steps", "10000"), recipe, 7, None) == (10000, 70)  # 10 epochs < 10%
    assert run_length(parse("--max-steps", "300"), recipe, 7, None) == (300, 30)  # capped at 10%
    assert run_length(parse("--max-steps", "9"), recipe, 7, None) == (9, 0)
    # A resumed run given a longer total keeps the warm-up it started with (3 steps of 30), where it
    # was put back inside a new 30-step one (lr 0.1 at step 10 fell to 0.037 and warmed up again).
    assert run_length(parse("--max-steps", "300"), recipe, 7, 30) == (300, 3)
    assert run_length(parse("--max-steps", "20"), recipe, 7, 300) == (20, 2)  # shorter: a tenth of the new total
    # With the warm-up the checkpoint kept: the same however often the total is lengthened.
    assert run_length(parse("--max-steps", "10000"), recipe, 100, 1000, saved_warmup=100) == (10000, 100)
    assert run_length(parse(), recipe, 100, 10000, saved_warmup=100) == (10000, 100)  # a plain resume of it
    assert run_length(parse("--max-steps", "20000"), recipe, 100, 10000, saved_warmup=100) == (20000, 100)
    assert run_length(parse("--max-steps", "500"), recipe, 100, 10000, saved_warmup=100) == (500, 50)  # shortened
    given = _recipe(warmup_epochs=2.5)
    assert run_length(parse("--max-steps", "300"), given, 8, None) == (300, 20)  # given: not capped at 10%
    assert run_length(parse("--max-steps", "10"), given, 8, None) == (10, 10)  # but never past the run
    with pytest.raises(UserError, match="the run would have 0 steps; pass --max-steps or --epochs of at least 1"):
        run_length(parse("--max-steps", "0"), recipe, 7, None)


def test_lr_help_names_every_optimizer_with_its_defaults():
    text = lr_help()
    parts = text.split("; ")
    assert [part.split(":")[0] for part in parts] == ["lars", "adamw", "sgd"]
    assert "lars: 0.2 x batch/256, wd 1.5e-06 (BYOL paper, App. C)" in parts
    assert "sgd: 0.05 x batch/256, wd 0.0001" in text and "adamw: 0.0005 x batch/256, wd 0.04" in text


def test_cifar_data_gets_the_cifar_recipe_unless_told_otherwise():
    from byol_pytorch.app.recipe import PRESETS

    recipe = resolve(parse("--data", "cifar10:/data"), None)
    assert recipe.recipe == "cifar" and recipe.model == "cifar_resnet18" and recipe.image_size == 32
    assert recipe.lr == pytest.approx(1.0) and recipe.weight_decay == 1e-5 and recipe.tau_base == 0.99
    assert (recipe.blur_p1, recipe.blur_p2, recipe.solarize_p1, recipe.solarize_p2) == (0, 0, 0, 0.2)
    assert recipe.crop_scale_min == 0.08 and recipe.lars_trust == 0.02 and recipe.lars_clip is True
    assert set(PRESETS["cifar"]["values"]) <= set(PRESETS["cifar"]["sources"])  # every value has its source
    assert run_length(parse(), recipe, 10, None)[0] == 1000 * 10  # solo-learn's 1000 epochs
    # Explicit flags win; the lr scales with the batch; another optimiser gets its own defaults.
    given = resolve(parse("--data", "cifar100:/d", "--batch-size", "512", "--blur-p1", "0.5", "--no-lars-clip"), None)
    assert given.lr == pytest.approx(2.0) and given.blur_p1 == 0.5 and given.lars_clip is False
    adamw = resolve(parse("--recipe", "cifar", "--optimizer", "adamw"), None)
    assert adamw.lr == pytest.approx(5e-4) and adamw.weight_decay == 0.04 and adamw.model == "cifar_resnet18"
    paper = resolve(parse("--data", "cifar10:/data", "--recipe", "paper"), None)
    assert paper.model == "resnet50" and paper.blur_p1 == 1.0 and paper.lars_trust == 1e-3
    assert resolve(parse("--data", "/images"), None).recipe == "paper"


def test_a_checkpoint_from_before_the_recipes_resumes_with_the_papers_views():
    saved = resolve(parse("--model", "resnet18"), None)
    older = {k: v for k, v in saved.to_dict().items() if k not in ("recipe", "crop_scale_min", "blur_p1", "lars_trust")}
    assert resolve(parse("--data", "cifar10:/data"), older) == saved  # not the cifar recipe, even for CIFAR data
    with pytest.raises(UserError, match="--blur-p1 0.0 differs from the checkpoint's 1.0"):
        resolve(parse("--blur-p1", "0"), older)
    with pytest.raises(UserError, match="--recipe cifar differs from the checkpoint's paper"):
        resolve(parse("--recipe", "cifar"), older)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(blur_p2=1.5), r"--blur-p2 is a probability in \[0, 1\], got 1.5"),
        (dict(crop_scale_min=0.0), r"--crop-scale-min must be in \(0, 1\]"),
        (dict(lars_trust=-1.0), "--lars-trust must be a finite number >= 0"),
        (dict(lars_trust=float("inf")), "--lars-trust must be a finite number >= 0"),  # before: "diverged"
        # Before: tracebacks from inside torch ("cannot be converted to type float without overflow",
        # "Overflow when unpacking long long").
        (dict(lr=1e300), r"--lr must be a positive finite number below 3\.4e\+38"),
        (dict(weight_decay=1e300), r"--weight-decay must be a finite number >= 0 below 3\.4e\+38"),
        (dict(seed=2**62), r"--seed must be a whole number between -2\*\*62 and 2\*\*62, got 4611686018427387904"),
    ],
)
def test_check_sizes_rejects_bad_view_and_lars_values(changes, message):
    with pytest.raises(UserError, match=message):
        check_sizes(_recipe(**changes), DistContext())


@pytest.mark.parametrize(
    "model, optimizer, lr, decay",
    [
        ("resnet50", "sgd", 0.05, 1e-4),  # the ResNets: SGD (SimSiam's lr and decay)
        ("mobilenetv3_small_100", "sgd", MOBILE_LR_PER_256, 1e-4),  # the mobile nets: SGD at their own lr
        ("efficientnet_b0", "sgd", MOBILE_LR_PER_256, 1e-4),
        ("convnext_atto", "adamw", CONVNEXT_LR_PER_256, 0.04),  # ConvNeXt: AdamW at ConvNeXt's lr, DINO's decay
        ("regnetx_002", "lars", 0.2, 1.5e-6),  # RegNets: the paper's LARS
        ("vit_small_patch16_224", "lars", 0.2, 1.5e-6),  # not measured: the paper's
        ("hf:my/model", "lars", 0.2, 1.5e-6),
    ],
)
def test_without_optimizer_the_family_chooses(model, optimizer, lr, decay):
    recipe = resolve(parse("--model", model), None)
    assert (recipe.optimizer, recipe.lr, recipe.weight_decay) == (optimizer, pytest.approx(lr), decay)
    assert optimizer_for(model)[0] == optimizer
    # a flag wins; the CIFAR preset keeps solo-learn's LARS; a resumed run keeps what it ran with
    other = "sgd" if optimizer != "sgd" else "adamw"  # a flag other than the family's choice wins
    assert resolve(parse("--model", model, "--optimizer", other), None).optimizer == other
    # the family's lr scales with the batch; --lr wins; a named --optimizer takes its own default lr
    assert resolve(parse("--model", model, "--batch-size", "512"), None).lr == pytest.approx(2 * lr)
    assert resolve(parse("--model", model, "--lr", "0.03"), None).lr == 0.03
    named = resolve(parse("--model", model, "--optimizer", optimizer), None)
    assert named.lr == pytest.approx(OPTIMIZERS[optimizer]["lr_per_256"])
    assert resolve(parse("--model", model, "--optimizer", "adamw"), None).lr == pytest.approx(5e-4)
    # the default is the run that names the family's optimiser and lr (what the matrix's probes ran)
    spelled = parse("--model", model, "--optimizer", optimizer, "--lr", str(lr))
    assert resolve(spelled, None).to_dict() == resolve(parse("--model", model), None).to_dict()
    assert resolve(parse("--model", model, "--data", "cifar10:/d"), None).lr == pytest.approx(1.0)  # solo-learn's
    # a run saved at another lr resumes at it, whatever the family's default now is
    saved_at = resolve(parse("--model", model, "--optimizer", optimizer, "--lr", "0.01"), None).to_dict()
    assert resolve(parse(), saved_at).lr == 0.01
    assert resolve(parse("--model", model, "--data", "cifar10:/d"), None).optimizer == "lars"
    saved = resolve(parse("--model", model, "--optimizer", "lars"), None).to_dict()
    assert resolve(parse(), saved).optimizer == "lars"


def test_the_start_line_names_the_familys_lr_unless_given():
    from byol_pytorch.app.train import _chosen

    args = parse("--model", "mobilenetv3_small_100")
    line = _chosen(args, resolve(args, None), None)
    assert f"chosen for mobile BatchNorm nets, at their lr {MOBILE_LR_PER_256:g} x batch/256;" in line
    given = parse("--model", "mobilenetv3_small_100", "--lr", "0.1")
    assert "at their lr" not in _chosen(given, resolve(given, None), None)
    assert "at their lr" not in _chosen(parse("--model", "resnet50"), resolve(parse("--model", "resnet50"), None), None)


def _readme_family_rows():
    """The README's "A recipe for the backbone" table: ``(fragments, optimiser, evidence)`` per row."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = markdown_rows(readme, "family (`--model` contains)").values()
    return [(re.findall(r"`([^`]+)`", family), optimizer, evidence) for family, optimizer, evidence in rows]


def test_the_readme_family_table_is_what_train_picks_and_quotes_its_evidence():
    rows = _readme_family_rows()
    assert len(rows) == len(FAMILY_OPTIMIZERS) + 1  # a row per family, and one for everything else
    for fragments, column, evidence in rows:
        optimizer = re.match(r"\w+", column)[0].lower()
        if not fragments:  # "anything else": the paper's LARS
            assert optimizer == "lars" and optimizer_for("vit_small_patch16_224")[0] == "lars"
            continue
        found = {family_of(fragment) for fragment in fragments}
        assert len(found) == 1, f"the README row {fragments} spans families {found}"
        family, chosen, quoted = found.pop()
        assert chosen == optimizer, f"README says {optimizer} for {family}, train picks {chosen}"
        rate = family_lr(fragments[0])  # a family with its own lr: the README's column names it
        if rate is not None:
            named = re.match(r"(\w+) ([\d.e-]+) x batch/256", column)
            assert named and float(named[2]) == pytest.approx(rate), (family, column)
        # every figure the start line prints as evidence is one the README's row shows
        missing = set(re.findall(r"\d+\.\d", quoted)) - set(re.findall(r"\d+\.\d", evidence))
        assert not missing, f"{family}: FAMILY_OPTIMIZERS quotes {sorted(missing)}, the README's table does not"


def test_backbone_batchnorm_is_the_papers_unless_frozen_is_asked_for():
    """``--backbone-bn``: batch statistics by default for every family and preset; ``frozen`` reaches the recipe."""
    for model in ("mobilenetv3_small_100", "resnet50", "convnext_atto", "vit_small_patch16_224"):
        assert resolve(parse("--model", model), None).backbone_bn == "batch"
        assert resolve(parse("--model", model, "--backbone-bn", "frozen"), None).backbone_bn == "frozen"
    assert resolve(parse("--data", "cifar10:/d", "--backbone-bn", "frozen"), None).backbone_bn == "frozen"
    with pytest.raises(SystemExit):
        parse("--backbone-bn", "clean")  # argparse's choices: batch, frozen
