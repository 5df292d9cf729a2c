"""The test tiers of tests/conftest.py: a fast test that starts a process or reaches PostgreSQL fails,
and tests that use the PostgreSQL server are marked ``postgres`` from their fixtures.

Each case runs a small test file in a pytest of its own, in this process, under a copy of the conftest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.fast

CONFTEST = Path(__file__).with_name("conftest.py").read_text(encoding="utf-8")


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\naddopts = --strict-markers\nmarkers =\n    fast\n    postgres\n    airflow\n")
    return pytester


def test_a_fast_test_that_starts_a_process_fails_however_it_starts_it(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import asyncio, os, subprocess, threading
        import pytest

        pytestmark = pytest.mark.fast

        @pytest.fixture(scope="module")
        def server():
            subprocess.Popen(["sleep", "60"])
            yield

        def test_run():
            subprocess.run(["true"], check=True)

        def test_fork():
            if os.fork() == 0:
                os._exit(0)

        def test_system():
            os.system("true")

        def test_asyncio():
            async def main():
                await asyncio.create_subprocess_exec("true")
            asyncio.run(main())

        def test_in_a_thread_that_swallows_the_error():
            def start():
                try:
                    subprocess.run(["true"])
                except BaseException:
                    pass
            thread = threading.Thread(target=start)
            thread.start()
            thread.join()

        def test_in_a_module_fixture(server):
            pass

        def test_in_process_code_passes():
            assert sum([1, 2]) == 3
        """
    )
    result = suite.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=5, errors=1)
    result.stdout.fnmatch_lines(["*this fast test started a process (subprocess.Popen)*'sleep'*"])
    result.stdout.fnmatch_lines(["*this fast test forked (os.fork)*"])


def test_a_module_fixture_of_a_slow_test_ends_unguarded_after_the_modules_last_fast_test(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        """
        import subprocess
        import pytest

        @pytest.fixture(scope="module")
        def service():
            unguarded = subprocess.Popen.__init__
            yield
            # Stopping a real service ends here, in the teardown of test_fast: it must not be refused.
            assert subprocess.Popen.__init__ is unguarded

        def test_slow(service):
            pass

        @pytest.mark.fast
        def test_fast():
            pass
        """
    )
    suite.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_a_fast_test_that_connects_to_postgresql_fails(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest
        from sqlalchemy import create_engine

        @pytest.mark.fast
        def test_connect():
            engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
        """
    )
    result = suite.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*this fast test connected to PostgreSQL*"])


def test_tests_on_the_postgresql_server_are_marked_postgres_from_their_fixtures(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(
        """
        import pytest

        @pytest.fixture(params=["sqlite", "postgresql"])
        def url(request):
            return request.param

        def test_both_backends(router_db):
            pass

        def test_own_variant(url):
            pass

        def test_server(postgres_url):
            pass

        def test_nothing():
            pass
        """
    )
    result = suite.runpytest_inprocess("-p", "no:cacheprovider", "--collect-only", "-q", "-m", "postgres")
    result.stdout.fnmatch_lines(
        [
            "*test_both_backends?postgresql?",
            "*test_own_variant?postgresql?",
            "*test_server",
            "3/6 tests collected (3 deselected)*",
        ]
    )
    fast = suite.runpytest_inprocess("-p", "no:cacheprovider", "--collect-only", "-q", "-m", "fast")
    fast.stdout.fnmatch_lines(["*test_both_backends?sqlite?", "1/6 tests collected (5 deselected)*"])


def test_a_fast_mark_on_a_test_that_uses_postgresql_stops_the_run(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.fast

        def test_server(postgres_url):
            pass
        """
    )
    result = suite.runpytest_inprocess("-p", "no:cacheprovider", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*marked fast but uses PostgreSQL or Airflow*", "*test_server*"])
