# Image for the portal's web, worker and beat containers (docker-compose.yml).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY requirements.txt constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt -r requirements.txt
COPY . .
RUN useradd --system --home /var/lib/datacenter datacenter \
    && mkdir -p /var/lib/datacenter /app/staticfiles \
    && chown -R datacenter /var/lib/datacenter /app/staticfiles
USER datacenter
EXPOSE 8000
