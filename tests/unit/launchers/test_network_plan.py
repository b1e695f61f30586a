"""Egress routes and the sandbox's /etc/hosts (pure planning, no sockets)."""

from femd.launchers.routes import hosts_file, plan_routes


def test_each_name_gets_its_own_loopback_address():
    routes = plan_routes(["fl.example:4433", "db.example:5432", "fl.example:8443"])
    assert [(r.host, r.port, r.inside) for r in routes] == [
        ("fl.example", 4433, "127.0.1.1"),
        ("db.example", 5432, "127.0.1.2"),
        ("fl.example", 8443, "127.0.1.1"),
    ]
    assert hosts_file(routes) == (
        "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
        "127.0.1.1\tfl.example\n127.0.1.2\tdb.example\n"
    )


def test_literals_keep_their_address_and_are_not_reused_for_names():
    routes = plan_routes(["127.0.1.1:80", "10.0.0.5:443", "a.example:1"])
    assert [r.inside for r in routes] == ["127.0.1.1", "10.0.0.5", "127.0.1.2"]
    assert hosts_file(routes).splitlines()[2:] == ["127.0.1.2\ta.example"]


def test_duplicates_and_case_are_one_route_and_localhost_stays_loopback():
    routes = plan_routes(["A.example:1", "a.example:1", "localhost:5000"])
    assert [(r.allowed, r.inside) for r in routes] == [
        ("A.example:1", "127.0.1.1"),
        ("localhost:5000", "127.0.0.1"),
    ]
    assert hosts_file(routes).count("localhost") == 2
