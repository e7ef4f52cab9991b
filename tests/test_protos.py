from digit_recognizer.protos.generate import PROTO_DIR, generate


def test_committed_stubs_match_the_proto(tmp_path):
    written = generate(tmp_path)
    assert {p.name for p in written} >= {"digits_pb2.py", "digits_pb2.pyi", "digits_pb2_grpc.py"}
    for fresh in written:
        committed = PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} is stale: run `make protos` and commit the result"
        )
