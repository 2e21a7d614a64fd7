"""Compiled programs kept on disk (:mod:`infer.executables`): a second engine of the same
settings loads every program without tracing or compiling, and decodes the same tokens;
anything that changes a program names another file; a file that cannot be read back is
dropped and compiled again."""

from __future__ import annotations

import pytest

import infer.executables
from infer.engine import Generator
from infer.executables import SUFFIX, ExecutableStore, code_digest
from infer.slots import SlotEngine, SlotParams
from tests.hf_reference import hf_model, to_orthrus

MAX_LEN = 32


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(to_orthrus(hf_model("qwen3", False, seed=0), block_size=4),
                     max_len=MAX_LEN)


def _engine(gen, store, **kw) -> SlotEngine:
    return SlotEngine(gen, slots=2, block_size=3, prefix_blocks=4, prefix_block_tokens=8,
                      prefill_chunk=8, executables=store, **kw)


def _decode(engine: SlotEngine) -> list[list[int]]:
    # prompts within the chunk's bucket (16), as the server's inserts are: longer ones are
    # chunked first, and warm_up compiles no insert past it
    out = {u.slot: u.new_ids for u in engine.insert_many(
        [(0, [5, 6, 7], SlotParams(6)), (1, list(range(1, 15)), SlotParams(5))])}
    while any(engine.busy):
        for u in engine.step(1):
            out[u.slot] += u.new_ids
            if u.finish_reason:
                engine.free(u.slot)
    return [out[0], out[1]]


def test_a_second_engine_loads_every_program_and_decodes_the_same(gen, tmp_path,
                                                                  backend_compiles):
    first = _engine(gen, ExecutableStore(tmp_path))
    first.warm_up()
    want = _decode(first)
    files = sorted(tmp_path.glob(f"*{SUFFIX}"))
    assert first.executables.saved == len(files) == len(first._programs) >= 6
    store = ExecutableStore(tmp_path)
    second = _engine(gen, store)

    def no_tracing(*args, **kwargs):
        raise AssertionError("a stored program was traced again")
    for name in ("_run_fn", "_insert_fn", "_free_fn", "_store_fn", "_chunk_fn"):
        setattr(second, name, no_tracing)
    n0 = backend_compiles()
    second.warm_up()
    assert backend_compiles() == n0 and store.loaded == len(files) and store.saved == 0
    assert _decode(second) == want


def test_other_settings_name_other_programs_and_bad_files_compile_again(gen, tmp_path,
                                                                        capsys, monkeypatch):
    store = ExecutableStore(tmp_path)
    a = _engine(gen, store)
    key = ("free",)
    args = (a.state, 0)
    assert a._digest(key, args) == _engine(gen, store)._digest(key, args)
    other = _engine(gen, store, plans={1: (2, 0), 2: (1, 0)})
    assert other._digest(key, args) != a._digest(key, args)  # plans are part of the name
    assert a._digest(("step", 1), args) != a._digest(key, args)
    before = a._digest(key, args)
    flags = __import__("os").environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", flags + " --xla_cpu_enable_fast_math=false")
    assert a._digest(key, args) != before  # XLA's flags too
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert a._digest(key, args) == before
    a.warm_up()
    path = tmp_path / f"{a._digest(key, (a.state, __import__('numpy').int32(0)))}{SUFFIX}"
    assert path.is_file()
    path.write_bytes(b"cut short")
    b = _engine(gen, ExecutableStore(tmp_path))
    b.warm_up()
    assert "dropping unreadable compiled program" in capsys.readouterr().err
    assert b.executables.saved == 1 and path.stat().st_size > 100  # compiled and saved again
    assert _decode(b) == _decode(_engine(gen, None))


def test_the_code_digest_follows_the_source(tmp_path, monkeypatch):
    assert len(code_digest()) == 64 and code_digest() == code_digest()
    for package in infer.executables.PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "m.py").write_text("x = 1\n")
    fake = tmp_path / "infer" / "executables.py"
    monkeypatch.setattr(infer.executables, "__file__", str(fake))
    code_digest.cache_clear()
    one = code_digest()
    (tmp_path / "orthrus_jax" / "m.py").write_text("x = 2\n")
    code_digest.cache_clear()
    assert code_digest() != one
    monkeypatch.undo()
    code_digest.cache_clear()


def test_the_store_stays_within_its_bound(tmp_path, monkeypatch):
    store = ExecutableStore(tmp_path)
    for i in range(4):
        (tmp_path / f"{i}{SUFFIX}").write_bytes(b"x" * 100)
        __import__("os").utime(tmp_path / f"{i}{SUFFIX}", (i, i))
    monkeypatch.setattr(infer.executables, "MAX_BYTES", 250)
    store._evict()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"2{SUFFIX}", f"3{SUFFIX}"]


@pytest.mark.slow
def test_programs_over_a_tensor_mesh_load_on_its_devices(tmp_path):
    """A program compiled over two of the eight devices runs there when loaded."""
    from orthrus_jax.sharding import make_mesh, shard_model

    mesh = make_mesh("tensor=2")
    model = shard_model(to_orthrus(hf_model("qwen3", False, seed=0), block_size=4), mesh)
    sharded = Generator(model, max_len=MAX_LEN, mesh=mesh)
    first = _engine(sharded, ExecutableStore(tmp_path))
    first.warm_up()
    want = _decode(first)
    second = _engine(sharded, ExecutableStore(tmp_path))
    second.warm_up()
    assert second.executables.loaded == len(second._programs) and not second.executables.saved
    assert _decode(second) == want


def test_programs_stored_while_the_compilation_cache_holds_them_still_run(gen, tmp_path):
    """With JAX's persistent cache on and already holding every program, the programs
    bound for a new store are compiled afresh (a copy of one loaded from that cache runs
    into missing functions on the CPU), and the cache is on again after the warm-up."""
    import jax

    from infer.compile_cache import enable_compile_cache, restored_compile_cache

    with restored_compile_cache():
        assert enable_compile_cache(tmp_path / "xla", enabled=True) is not None
        _engine(gen, None).warm_up()  # fills JAX's cache
        first = _engine(gen, ExecutableStore(tmp_path / "a"))
        first.warm_up()
        assert jax.config.jax_enable_compilation_cache
        want = _decode(first)
        second = _engine(gen, ExecutableStore(tmp_path / "a"))
        second.warm_up()
        assert second.executables.loaded == len(second._programs)
        assert _decode(second) == want
