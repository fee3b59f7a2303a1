"""Block D-MMD: Algorithm 1 per block against a replay that evaluates every network block by block
on the clean prefix, the block size taken from the teacher, block students sampled block by
block, CPU training end to end (masked and uniform teachers), and one-line refusals."""

import pytest
import torch

from mdlm_dmmd import cli
from mdlm_dmmd.algos.dmmd import DMMD, distillation_times, generator_loss
from mdlm_dmmd.checkpoints import save_backbone
from mdlm_dmmd.denoiser import BlockDenoiser
from mdlm_dmmd.diffusion import block
from mdlm_dmmd.diffusion.block_sampling import BlockSampler
from mdlm_dmmd.diffusion.sampling import sample_categorical
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiTConfig
from mdlm_dmmd.pipeline import Pipeline

from conftest import host_config, random_model

VOCAB, LENGTH, BLOCK = 17, 64, 16


def block_teacher(directory, *, block_size=BLOCK, seed=0, uniform=False, ignore_bos=False):
    """A random masked (or uniform) block teacher (BD3-LM layout) saved as an exported directory."""
    model = random_model(DiTConfig(vocab_size=VOCAB + (0 if uniform else 1), length=LENGTH, hidden_dim=32, cond_dim=16,
                                   n_blocks=1, n_heads=2, dropout=0.0), seed=seed)
    process = {"process": "uniform", "vocab_size": VOCAB, "time_conditioning": True} if uniform else \
        {"process": "masked", "mask_id": VOCAB, "time_conditioning": False}
    meta = {**process, "schedule": "loglinear", "schedule_eps": 1e-3, "block_size": block_size, "cross_attn": True,
            "algo": "bd3lm", "ignore_bos": ignore_bos}
    return save_backbone(directory, model, meta)


def config(teacher, block_size=None, **algo):
    extra = {} if block_size is None else {"block_size": block_size}
    return host_config({"name": "dmmd", "teacher": str(teacher), "sampling_steps": 4, "noise_input": False, **algo},
                       vocab=VOCAB, length=LENGTH, **extra)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return block_teacher(tmp_path_factory.mktemp("block_teacher"))


def test_generator_loss_equals_a_block_by_block_replay(teacher):
    """Replay the algo's draws (s, t per (sequence, block); z_t; the hard x; z_s) and evaluate
    generator, teacher and auxiliary block by block in the sampling layout (clean prefix, then
    the block): eq. 11 per token on positions still masked in z_s, summed, over B·L."""
    algo = DMMD(config(teacher))
    assert algo.block == BLOCK and isinstance(algo.sampler(), BlockSampler)
    for seed, network in enumerate((algo.generator, algo.aux), start=1):  # three different networks
        network.load_state_dict(random_model(network.config, seed=seed).state_dict())
    x_data = torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    loss, _ = algo.phase_loss({"input_ids": x_data}, "gen")

    torch.manual_seed(11)
    n = LENGTH // BLOCK
    s, t = (block.per_token(u.view(3, n), BLOCK) for u in distillation_times(3 * n, 4, "cpu"))
    process = algo.process
    z_t = process.corrupt(x_data, t)

    def by_blocks(network, z, times):
        denoiser = BlockDenoiser(network, process, False, block_size=BLOCK)
        parts = [denoiser.block_log_probs(z[:, j * BLOCK:(j + 1) * BLOCK], times[:, j * BLOCK],
                                          prefix=x_data[:, : j * BLOCK] if j else None) for j in range(n)]
        return torch.cat(parts, dim=1)

    with torch.no_grad():
        p_gen = by_blocks(algo.generator, z_t, t).exp()
        # the draw order of the gathered masked path: reveals first, then one uniform per token,
        # used for x at the revealed tokens
        masked = z_t == process.mask_id
        reveal = process.reveal_probability(z_t, t, s)
        revealed = masked & (torch.rand(z_t.shape, dtype=torch.float64) < reveal)
        x = z_t.clone()
        uniforms = torch.rand(z_t.shape, dtype=torch.float64)
        x[revealed] = sample_categorical(p_gen[revealed], uniforms=uniforms[revealed])
        z_s = torch.where(revealed, x, z_t)
        teacher_log_p = by_blocks(algo.teacher, z_s, s)
        aux_log_p = by_blocks(algo.aux, z_s, s)
    per_token = generator_loss(p_gen, teacher_log_p, aux_log_p, torch.ones_like(s))
    expected = (per_token * process.denoising_positions(z_s)).sum() / (3 * LENGTH)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-7)
    assert abs(loss.item()) > 1e-4  # the three networks differ: the loss is not trivially zero


def test_block_size_comes_from_the_teacher(teacher):
    assert DMMD(config(teacher, block_size=BLOCK)).block == BLOCK  # explicit and equal: fine
    assert DMMD(config(teacher)).block == BLOCK  # not given: the teacher's
    for other in (32, LENGTH):  # another block size, or plain diffusion (= model.length)
        with pytest.raises(UserError, match=rf"block_size={other} differs from the teacher's block_size=16 .* pass 16"):
            DMMD(config(teacher, block_size=other))


def test_plain_teacher_refuses_a_block_student(tmp_path):
    plain = random_model(DiTConfig(vocab_size=VOCAB + 1, length=LENGTH, hidden_dim=32, cond_dim=16, n_blocks=1,
                                   n_heads=2, dropout=0.0))
    path = save_backbone(tmp_path / "plain", plain, {"process": "masked", "mask_id": VOCAB, "schedule": "loglinear",
                                                     "time_conditioning": False})
    with pytest.raises(UserError, match=r"block_size=16: the teacher .* is not a block-diffusion model"):
        DMMD(config(path, block_size=16))
    assert DMMD(config(path)).block is None


def test_noise_pyramid_needs_a_plain_teacher(teacher):
    with pytest.raises(UserError, match="algo.noise_pyramid=true needs a plain teacher"):
        DMMD(config(teacher, noise_input=True, noise_pyramid=True))
    student = DMMD(config(teacher, noise_input=True))
    assert student.generator.config.noise_grid is None and student.generator.config.noise_dim > 0  # white noise


@pytest.mark.parametrize("process", ["masked", "uniform"])
def test_block_students_train_and_sample_block_by_block(tmp_path, process):
    teacher_dir = tmp_path / "teacher"
    common = ["data=shakespeare", "debug=cpu", "model.length=16", "sampling.num_samples=2", "sampling.steps=2"]
    assert cli.main(["algo=bd3lm", f"algo.process={process}", "block_size=4", "trainer.max_steps=2",
                     f"run_dir={teacher_dir}", *common]) == 0
    student_dir = tmp_path / "student"
    assert cli.main(["algo=dmmd", f"algo.teacher={teacher_dir / 'checkpoints' / 'final.ckpt'}", "algo.sampling_steps=2",
                     "trainer.max_steps=4", f"run_dir={student_dir}", *common]) == 0
    pipeline = Pipeline.from_checkpoint(student_dir / "checkpoints" / "final.ckpt")
    assert pipeline.meta.block_size == 4 and pipeline.meta.cross_attn and pipeline.meta.sampling_steps == 2
    assert isinstance(pipeline.sampler, BlockSampler) and pipeline.sampler.rule == "generator"
    samples = pipeline.generate(2, steps=2, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 16) and (samples[:, 0] == pipeline.sampler.first_token).all()  # ignore_bos: BOS first


def test_uniform_block_student_keeps_a_clean_first_token_where_the_teacher_did(tmp_path):
    """ignore_bos: the teacher never saw a noisy first token, so neither z_t nor z_s (which a
    uniform posterior could re-noise) has one, and no loss counts it."""
    teacher = block_teacher(tmp_path / "uniform", uniform=True, ignore_bos=True)
    with pytest.raises(UserError, match=r"was trained with ignore_bos .* but this data has no BOS token"):
        DMMD(config(teacher))  # digits: the sampler could not start a sequence with BOS
    cfg = config(teacher)
    cfg["vocab"]["bos_id"] = 0  # as if token 0 were the data's BOS
    algo = DMMD(cfg)
    assert algo.sampler().first_token == 0
    assert algo.settings.loss_space == "posterior" and algo.first_token_clean
    x_data = torch.randint(0, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(1))
    inputs = []
    log_probs = algo.log_probs
    algo.log_probs = lambda network, z, *a, **k: inputs.append(z.clone()) or log_probs(network, z, *a, **k)
    for phase in ("gen", "aux"):
        for seed in range(3):
            torch.manual_seed(seed)
            algo.phase_loss({"input_ids": x_data}, phase)
    assert len(inputs) == 3 * 2 * 3 and all(torch.equal(z[:, 0], x_data[:, 0]) for z in inputs)
    assert algo.scored(torch.ones(2, 5))[:, 0].sum() == 0
    total, count = algo.loss({"input_ids": x_data})
    assert count == 4 * (LENGTH - 1)
