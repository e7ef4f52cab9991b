from digit_recognizer.protos.generate import PROTO_DIR, generate


def test_committed_stubs_match_the_proto(tmp_path):
    written = generate(tmp_path)
    assert {p.name for p in written} == {
        f"{proto}{suffix}"
        for proto in ("digits_pb2", "inference_pb2", "model_config_pb2")
        for suffix in (".py", ".pyi", "_grpc.py")
    }
    for fresh in written:
        committed = PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} is stale: run `make protos` and commit the result"
        )
