#!/usr/bin/env bash
# Runs `ansible-test sanity` on the reconciler.edge collection with the venv's ansible-core.
# ansible-test builds one virtual environment per sanity test and bootstraps pip in each with a
# get-pip script it downloads from Ansible's CI file host; where only PyPI is reachable, a stand-in
# (Python's bundled pip via ensurepip, then `pip install` from the configured index) is put in its
# cache instead. Everything lives in a throw-away HOME, so ~/.ansible is left alone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
home=$(mktemp -d /tmp/reconciler-ansible-test.XXXXXX)
trap 'rm -rf "$home"' EXIT
# The pip version ansible-test bootstraps names the cached script it looks for.
pip_version=$(sed -n "s/^ *pip='\([0-9.]*\)',$/\1/p" \
  "$("$root/.venv/bin/python" -c 'import ansible_test, os; print(os.path.dirname(ansible_test.__file__))')/_internal/python_requirements.py" | head -1)
mkdir -p "$home/.ansible/test/cache"
# A CA bundle from this environment (a TLS-inspecting proxy's) must reach pip, which runs without it.
cert=${PIP_CERT:-${SSL_CERT_FILE:-}}
cat > "$home/.ansible/test/cache/get_pip_${pip_version//./_}.py" <<PY
# Stand-in for get-pip.py: Python's bundled pip, then \`pip install ARGS\` from the configured index.
import ensurepip, sys
ensurepip.bootstrap()
from pip._internal.cli.main import main
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
cert = "$cert"
sys.exit(main(["install", *(["--cert", cert] if cert else []), *args]))
PY
# ansible-test passes pip no environment variables: carry the user's pip configuration over.
[ -f "$HOME/.config/pip/pip.conf" ] && mkdir -p "$home/.config/pip" && cp "$HOME/.config/pip/pip.conf" "$home/.config/pip/"
cd "$here/ansible_collections/reconciler/edge"
rm -rf tests/output
rc=0
HOME=$home PATH="$root/.venv/bin:$PATH" ansible-test sanity --python "$("$root/.venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" "$@" || rc=$?
rm -rf tests/output
exit $rc
