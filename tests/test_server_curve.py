"""ZeroMQ CURVE on the driver port: an authorised key is served, any other gets nothing; a
non-loopback bind without keys is refused unless explicitly insecure. Real sockets, real keys."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_server import driver_spec, obs, spec

from qc_robot import protocol as P
from qc_robot.drivers.client import HandshakeError, PolicyClient
from qc_robot.policies.scripted import HoldPolicy
from qc_robot.server.app import ControlServer
from qc_robot.server.learner_link import CurveKeys, make_keys


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("server", "driver", "intruder"):
        out[f"{name}_pub"], out[f"{name}_sec"] = make_keys(str(tmp_path / name), name)
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    shutil.copy(out["driver_pub"], authorized)
    out["authorized"] = str(authorized)
    return out


def test_authorised_driver_is_served_and_others_get_nothing(keys: dict[str, str]) -> None:
    curve = CurveKeys.from_files(keys["server_sec"], authorized_dir=keys["authorized"])
    srv = ControlServer(HoldPolicy(spec()), "tcp://127.0.0.1:*", curve=curve).start()
    hello = driver_spec().hello("t")
    good = PolicyClient(srv.address, hello, curve=CurveKeys.from_files(keys["driver_sec"], keys["server_pub"]))
    intruder = PolicyClient(srv.address, hello, curve=CurveKeys.from_files(keys["intruder_sec"], keys["server_pub"]))
    keyless = PolicyClient(srv.address, hello)
    try:
        good.connect(5.0)
        assert good.request(obs(), 0, 0) is not None
        assert isinstance(good.poll(5.0), P.Chunk)
        seen = srv.stats.received
        for c in (intruder, keyless):
            with pytest.raises(HandshakeError, match="no answer"):
                c.connect(1.0)
            assert c.ping(0.3) is None
        assert srv.stats.received == seen  # not one of their messages reached the server
        assert good.ping(2.0) is not None  # and the authorised driver is still served
    finally:
        for c in (good, intruder, keyless):
            c.close()
        srv.stop()


def test_remote_bind_needs_keys_unless_marked_insecure(keys: dict[str, str]) -> None:
    policy = HoldPolicy(spec())
    with pytest.raises(ValueError, match="CURVE"):
        ControlServer(policy, "tcp://0.0.0.0:5999", allow_remote=True)
    with pytest.raises(ValueError, match="allow_remote"):
        ControlServer(policy, "tcp://0.0.0.0:5999", insecure_remote=True)
    ControlServer(policy, "tcp://0.0.0.0:5999", allow_remote=True, insecure_remote=True)  # explicit opt-out
    curve = CurveKeys.from_files(keys["server_sec"], authorized_dir=keys["authorized"])
    ControlServer(policy, "tcp://0.0.0.0:5999", allow_remote=True, curve=curve)  # keys: fine
    with pytest.raises(ValueError, match="authorized"):
        ControlServer(policy, "tcp://127.0.0.1:*", curve=CurveKeys.from_files(keys["server_sec"]))


def test_serve_config_turns_curve_on(keys: dict[str, str]) -> None:
    from qc_robot.server.config import ServeConfig
    from qc_robot.server.serve import _driver_curve

    assert _driver_curve(ServeConfig(policy="hold:4:2:3")) is None
    cfg = ServeConfig(policy="hold:4:2:3", curve_secret_key=keys["server_sec"], driver_authorized_dir=keys["authorized"])
    curve = _driver_curve(cfg)
    assert curve is not None and curve.authorized_dir == keys["authorized"] and len(curve.secret) == 40
    with pytest.raises(ValueError, match="curve_secret_key"):
        _driver_curve(ServeConfig(policy="hold:4:2:3", driver_authorized_dir=keys["authorized"]))
    np.testing.assert_equal(len(curve.public), 40)


def test_qc_robot_drive_with_keys_is_served_and_without_is_not(keys: dict[str, str], capsys) -> None:
    from qc_robot.drivers.config import DriveConfig
    from qc_robot.drivers.drive import run_drive
    from qc_robot.policies.scripted import simple_spec

    curve = CurveKeys.from_files(keys["server_sec"], authorized_dir=keys["authorized"])
    srv = ControlServer(HoldPolicy(simple_spec(10, 5, 5)), "tcp://127.0.0.1:*", curve=curve).start()
    try:
        base = dict(driver="mock", server=srv.address, episodes=1, driver_args={"max_episode_steps": 10},
                    connect_timeout_s=1.0)
        assert run_drive(DriveConfig(**base, curve_secret_key=keys["driver_sec"],
                                     curve_server_key=keys["server_pub"])) == 0
        assert srv.stats.chunks >= 2
        assert run_drive(DriveConfig(**base)) == 2  # keyless: no answer at all
        assert run_drive(DriveConfig(**base, curve_secret_key=keys["intruder_sec"],
                                     curve_server_key=keys["server_pub"])) == 2
        out = capsys.readouterr().out
        assert out.count("no answer from") == 2
    finally:
        srv.stop()
