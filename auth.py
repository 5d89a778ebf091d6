"""Passwords and API tokens. Only hashes are stored: a leaked database gives away neither."""

import hashlib
import hmac
import secrets

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1


def hash_password(password):
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode('utf-8'), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return f'scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}'


def verify_password(password, stored):
    try:
        scheme, n, r, p, salt, digest = stored.split('$')
    except ValueError:
        return False
    if scheme != 'scrypt':
        return False
    candidate = hashlib.scrypt(password.encode('utf-8'), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p))
    return hmac.compare_digest(candidate.hex(), digest)


def new_token():
    return 'topn_' + secrets.token_urlsafe(32)


def token_hash(token):
    """Tokens are long random strings, so a plain SHA-256 is enough to look them up safely."""
    return hashlib.sha256(token.encode('utf-8')).hexdigest()
