# Two commands on a fresh Debian 12 machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
BROKER := .run/broker
# The demo broker's port on 127.0.0.1 (`make demo BROKER_PORT=18830` when 1883 is taken).
BROKER_PORT ?= 1883
export BROKER_PORT
DEMO_URI := qemu:///system
DEMO_ENV := RECONCILER_LIBVIRT_URI=$(DEMO_URI) \
            RECONCILER_MQTT_URL=mqtt://127.0.0.1:$(BROKER_PORT) \
            RECONCILER_MQTT_USERNAME=admin \
            RECONCILER_MQTT_PASSWORD_FILE=$(BROKER)/admin.password
# What manifests/edge-node.yaml makes (its pool lives where libvirt keeps images, so that QEMU can
# reach it whatever folder the repository was cloned into).
DEMO_VM := demo-gw-1
DEMO_DISKS := demo-gw-root demo-gw-data
DEMO_POOL := demo-edge
DEMO_POOL_DIR := /var/lib/libvirt/images/reconciler-demo
VIRSH := virsh -q -c $(DEMO_URI)

.PHONY: setup demo test bench lint clean-demo demo-guest clean-demo-guest

setup:
	bash scripts/setup.sh

demo: setup
	$(DEMO_ENV) $(PY) -m reconciler validate manifests/
	$(DEMO_ENV) $(PY) -m reconciler apply manifests/
	@echo "--- second run: must change nothing"
	$(DEMO_ENV) $(PY) -m reconciler apply manifests/

test: setup
	bash scripts/run-tests.sh

# A gateway VM that boots and publishes on edge/device/data (examples/guest/gateway.yaml): builds the
# tiny guest from Debian packages, generates the two broker passwords (files only, never printed),
# applies twice, then waits as the declared dashboard for the gateway's first message.
GUEST_SECRETS := .run/demo-guest
demo-guest: setup
	bash scripts/build-tiny-guest.sh >/dev/null
	@mkdir -p $(GUEST_SECRETS) && chmod 0700 $(GUEST_SECRETS)
	@for f in gateway dashboard; do [ -s $(GUEST_SECRETS)/$$f.password ] || \
	  (umask 077; $(PY) -c "import secrets; print(secrets.token_urlsafe(24))" >$(GUEST_SECRETS)/$$f.password); done
	@[ "$(BROKER_PORT)" = 1883 ] || echo "demo-guest: the guest's user data publishes to port 1883; edit examples/guest/gateway.yaml for $(BROKER_PORT)"
	$(DEMO_ENV) $(PY) -m reconciler validate examples/guest/
	$(DEMO_ENV) $(PY) -m reconciler apply examples/guest/
	@echo "--- second run: must change nothing"
	$(DEMO_ENV) $(PY) -m reconciler apply examples/guest/
	@echo "--- waiting (up to 4 min under TCG) for the gateway's data as the declared dashboard"
	@start=$$(date +%s); mosquitto_sub -h 127.0.0.1 -p $(BROKER_PORT) -u demo-dashboard \
	  -P "$$(cat $(GUEST_SECRETS)/dashboard.password)" -t edge/device/data -C 1 -W 240 -v && \
	  echo "--- the gateway's data arrived $$(( $$(date +%s) - start ))s after the second apply"

clean-demo-guest:
	-$(VIRSH) destroy demo-gateway >/dev/null 2>&1
	-$(VIRSH) undefine demo-gateway >/dev/null 2>&1
	-$(VIRSH) vol-delete --pool demo-guest demo-gateway-cidata >/dev/null 2>&1
	-$(VIRSH) pool-destroy demo-guest >/dev/null 2>&1
	-$(VIRSH) pool-delete demo-guest >/dev/null 2>&1
	-$(VIRSH) pool-undefine demo-guest >/dev/null 2>&1

bench: setup
	$(PY) bench/bench.py

lint:
	$(PY) -m pyflakes reconciler tests 2>/dev/null || true

# Removes what `make demo` made: the VM, its disks, the pool and its folder, and stops the demo
# broker (its data stays under .run/broker). Safe to run again: what is gone already is skipped,
# and the last lines fail loudly if anything the demo made is still there.
clean-demo:
	@if $(VIRSH) domstate $(DEMO_VM) >/dev/null 2>&1; then \
	  $(VIRSH) destroy $(DEMO_VM) >/dev/null 2>&1 || true; \
	  $(VIRSH) undefine $(DEMO_VM) --nvram >/dev/null 2>&1 || $(VIRSH) undefine $(DEMO_VM) >/dev/null; \
	  echo "clean-demo: VM $(DEMO_VM) removed"; fi
	@if $(VIRSH) pool-info $(DEMO_POOL) >/dev/null 2>&1; then \
	  $(VIRSH) pool-start $(DEMO_POOL) >/dev/null 2>&1 || true; \
	  for v in $(DEMO_DISKS); do \
	    if $(VIRSH) vol-info --pool $(DEMO_POOL) $$v >/dev/null 2>&1; then \
	      $(VIRSH) vol-delete --pool $(DEMO_POOL) $$v >/dev/null && echo "clean-demo: disk $$v removed"; fi; \
	  done; \
	  if [ -z "$$($(VIRSH) vol-list $(DEMO_POOL) 2>/dev/null)" ]; then \
	    $(VIRSH) pool-destroy $(DEMO_POOL) >/dev/null 2>&1 || true; \
	    $(VIRSH) pool-delete $(DEMO_POOL) >/dev/null 2>&1 || true; \
	    $(VIRSH) pool-undefine $(DEMO_POOL) >/dev/null && echo "clean-demo: pool $(DEMO_POOL) removed"; \
	  else echo "clean-demo: pool $(DEMO_POOL) kept: it holds volumes the demo did not make"; fi; fi
	@rmdir $(DEMO_POOL_DIR) 2>/dev/null || true
	@if [ -x $(PY) ]; then $(PY) scripts/devbroker.py stop --dir $(BROKER); \
	  else python3 scripts/devbroker.py stop --dir $(BROKER); fi
	@! $(VIRSH) domstate $(DEMO_VM) >/dev/null 2>&1 || { echo "clean-demo: VM $(DEMO_VM) is still defined" >&2; exit 1; }
	@for v in $(DEMO_DISKS); do ! $(VIRSH) vol-path --pool $(DEMO_POOL) $$v >/dev/null 2>&1 || \
	  { echo "clean-demo: disk $$v is still there" >&2; exit 1; }; done
