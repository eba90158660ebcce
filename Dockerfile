# The one image of docker-compose.yml: the hypervisor, the toolstack and the guest replicas
# are all the `xensim` command, with different arguments.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hypervisor ./hypervisor
COPY guestlib ./guestlib
COPY xensim ./xensim
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /
ENTRYPOINT ["xensim"]
CMD ["--help"]
