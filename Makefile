# Two commands on a fresh Debian 12 machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
BROKER := .run/broker
DEMO_ENV := RECONCILER_LIBVIRT_URI=qemu:///system \
            RECONCILER_MQTT_URL=mqtt://127.0.0.1:1883 \
            RECONCILER_MQTT_USERNAME=admin \
            RECONCILER_MQTT_PASSWORD_FILE=$(BROKER)/admin.password

.PHONY: setup demo test bench lint clean-demo

setup:
	bash scripts/setup.sh

demo: setup
	$(DEMO_ENV) $(PY) -m reconciler validate manifests/
	$(DEMO_ENV) $(PY) -m reconciler apply manifests/
	@echo "--- second run: must change nothing"
	$(DEMO_ENV) $(PY) -m reconciler apply manifests/

test: setup
	bash scripts/run-tests.sh

bench: setup
	$(PY) bench/bench.py

lint:
	$(PY) -m pyflakes reconciler tests 2>/dev/null || true

clean-demo:
	-virsh -c qemu:///system destroy demo-gw-1 2>/dev/null
	-virsh -c qemu:///system undefine demo-gw-1 2>/dev/null
