# rbee: `make run` runs the seed job on this machine, `make test` runs the tests.
# Each target installs what it needs first (a .venv, the default model).

# The venv is made from the system's Python when there is one: simulated test hosts bind-mount
# their own /root, where a pyenv Python would vanish.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV   := .venv
VPY    := $(VENV)/bin/python
MODEL  := $(CURDIR)/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
PROMPT ?= write a short story
# llama.cpp's RPC backend (a model split across machines) on top of the GPU flags of this machine
LLAMA_CMAKE_ARGS := -DGGML_RPC=on $(shell command -v nvidia-smi >/dev/null 2>&1 && echo -DGGML_CUDA=on)
# ggml is built for this CPU (-march=native), and on a CPU with AMX that brings in ggml's AMX
# kernels, which crash now and then (a general protection fault at ldtilecfg: llama.cpp #20824,
# #26954); every ggml here is built without them, where the compiler knows the flags (x86, GCC 11+)
AMX_OFF := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
NO_AMX  := $(shell echo 'int x;' | $${CC:-cc} $(AMX_OFF) -x c -c -o /dev/null - 2>/dev/null && echo $(AMX_OFF))
GGML_BUILD_ENV = CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc)

.PHONY: setup model sysdeps run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(GGML_BUILD_ENV) $(VPY) -m pip install -q -r requirements.txt
	@# a llama-cpp-python from pip's wheel cache built before without the RPC backend (a split's parts,
	@# issue 13) or with the AMX kernels: build it again, from its sdist
	$(VPY) -c "import llama_cpp as l, sys; sys.exit(0 if l.llama_supports_rpc() and ('$(NO_AMX)' == '' \
	    or b'AMX_INT8 = 1' not in l.llama_print_system_info()) else 1)" || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(GGML_BUILD_ENV) $(VPY) -m pip install -q \
	    --force-reinstall --no-deps --no-binary llama-cpp-python --no-cache-dir llama-cpp-python==0.3.36
	touch $@

model: setup $(MODEL)

$(MODEL):
	$(VPY) scripts/fetch_model.py $(dir $(MODEL))

run: model
	$(VPY) rbee.py infer --node localhost --model file:$(MODEL) \
	  --prompt "$(PROMPT)" --max-tokens 20 --temperature 0.7

# the tests run a real sshd and simulated hosts in network namespaces
sysdeps:
	@if ! test -x /usr/sbin/sshd || ! command -v ip >/dev/null || ! command -v ssh >/dev/null \
	    || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "installing openssh-server, openssh-client, iproute2, chromium, chromium-driver (the page's test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    openssh-server openssh-client iproute2 chromium chromium-driver >/dev/null; fi
	@mkdir -p /run/sshd

# a second llama-cpp-python, another ggml build, for the test of a split over nodes whose builds differ:
# it only has to say which ggml it is, so it is built without llava and unoptimised (7 min on 2 cores, not 10)
OTHER_VENV := .cache/other-venv
OTHER_CMAKE_ARGS := -DGGML_RPC=on -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS_RELEASE=-O0 -DCMAKE_CXX_FLAGS_RELEASE=-O0
$(OTHER_VENV)/.installed:
	test -x $(OTHER_VENV)/bin/python || $(PYTHON) -m venv $(OTHER_VENV)
	CMAKE_ARGS="$(OTHER_CMAKE_ARGS)" $(GGML_BUILD_ENV) $(OTHER_VENV)/bin/python -m pip install -q \
	  llama-cpp-python==0.3.35
	touch $@

test: model sysdeps $(OTHER_VENV)/.installed
	$(VPY) -m pytest -n 2 -v tests

# llama.cpp's own llama-server, built once from the llama.cpp that the llama-cpp-python sdist vendors
LLAMA_SDIST  := .cache/sdist/llama_cpp_python-0.3.36
LLAMA_SERVER := .cache/llama.cpp-build/bin/llama-server

$(LLAMA_SERVER): | setup
	$(VPY) -m pip install -q cmake ninja
	mkdir -p .cache/sdist
	test -d $(LLAMA_SDIST) || ($(VPY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 \
	  -d .cache/sdist && tar -xzf .cache/sdist/llama_cpp_python-0.3.36.tar.gz -C .cache/sdist)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(GGML_BUILD_ENV) cmake -S $(LLAMA_SDIST) -B .cache/llama.cpp-build -G Ninja \
	  -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TOOLS=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH ninja -C .cache/llama.cpp-build llama-server

bench: model $(LLAMA_SERVER)
	$(VPY) -m pip install -q 'llama-cpp-python[server]==0.3.36'
	LLAMA_SERVER=$(CURDIR)/$(LLAMA_SERVER) $(VPY) bench/bench.py

clean:
	rm -rf $(VENV) .cache bench/results.json
